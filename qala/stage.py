"""What every stage (train, tune, search) does with its output folder: one run at a time, a record of the
recipe, and results reused only for the same inputs by content.

- `stage_lock(folder)`: the folder's lock for the whole run (qala.utils.output_lock), held by the process that
  writes there (the main one of a distributed run); a second run on the folder fails at once, naming the holder.
- `write_recipe(folder, recipe)`: folder/recipe.yaml, written once the stage's inputs have loaded.
- `stage_inputs({...})` and `stored_record(path, inputs)`: a stored result (tune's fp32 scores and trials, a
  search's generation checkpoint, a trained stage, its evaluation) is a JSON record that carries the inputs it
  was computed from, by content (model files, questions, calibration batches) and the settings that shape
  them. It is reused only for the same inputs; otherwise it is computed again, and the stage logs one line
  saying what changed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from qala.recipe import Recipe, changed_keys
from qala.utils import atomic_write_text, output_lock

RECIPE_NAME = "recipe.yaml"


def is_main_process() -> bool:
    """Whether this process writes the stage's output folder: the only process, or rank 0 of a distributed run
    (torch's process group when one is initialised, else torchrun's RANK, set before the Trainer starts one)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def stage_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder`'s lock for the block on the main process; the other ranks of a distributed run write nothing
    there, and would only wait on the lock their own rank 0 holds."""
    with output_lock(folder) if is_main_process() else contextlib.nullcontext():
        yield


def write_recipe(folder: str | Path, recipe: Recipe) -> None:
    """folder/recipe.yaml. Called once the stage's model and data have loaded (and a resume was accepted): a start
    that fails at once (a bad path, a refused resume) leaves the last run's record."""
    atomic_write_text(Path(folder) / RECIPE_NAME, recipe.to_yaml())


def stage_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a stored result depends on, as it reads back from JSON (tuples as lists), so that a stored record
    compares equal to this run's."""
    return json.loads(json.dumps(inputs))


def what_changed(recorded: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None) -> str:
    """Why a stored result does not fit this run, for the one log line that says it is computed again."""
    if not recorded or not inputs:
        return "no record of its inputs"
    return "; ".join(changed_keys(dict(recorded), dict(inputs)))


def stored_record(
    path: str | Path | None,
    inputs: Mapping[str, Any] | None,
    *,
    fingerprint: str | None = None,
    field: str = "inputs",
    changes: Callable[[dict[str, Any]], list[str]] | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON record at `path`, None) when it was stored for this run's inputs: its `field` ("inputs") equals
    `inputs`, or, where `fingerprint` is given, its "fingerprint" equals that; (None, what changed) when it was
    stored for other inputs, said by `changes(record)` where the fingerprint covers more than the recorded inputs
    (a trained stage's recipe sections); (None, None) when there is no such file."""
    if path is None or not Path(path).is_file():
        return None, None
    record = json.loads(Path(path).read_text())
    same = record.get("fingerprint") == fingerprint if fingerprint is not None else record.get(field) == inputs
    if same:
        return record, None
    return None, "; ".join(changes(record)) if changes is not None else what_changed(record.get(field), inputs)
