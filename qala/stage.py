"""The rule by which a stage reuses what an earlier run stored in its output folder.

A stored result (tune's fp32 scores and trials, a search's generation checkpoint) is a JSON record that
carries the inputs it was computed from, by content: model files, questions, calibration batches and the
settings that shape them. It is reused only for the same inputs; otherwise it is computed again, and the
stage logs one line saying what changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qala.recipe import changed_keys


def what_changed(recorded: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None) -> str:
    """Why a stored result does not fit this run, for the one log line that says it is computed again."""
    if not recorded or not inputs:
        return "no record of its inputs"
    return "; ".join(changed_keys(dict(recorded), dict(inputs)))


def stored_record(
    path: str | Path | None, inputs: Mapping[str, Any] | None, *, fingerprint: str | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON record at `path`, None) when it was stored for this run's inputs: its "inputs" equal `inputs`,
    or, where `fingerprint` is given, its "fingerprint" equals that; (None, what changed) when it was stored
    for other inputs; (None, None) when there is no such file."""
    if path is None or not Path(path).is_file():
        return None, None
    record = json.loads(Path(path).read_text())
    same = record.get("fingerprint") == fingerprint if fingerprint is not None else record.get("inputs") == inputs
    return (record, None) if same else (None, what_changed(record.get("inputs"), inputs))
