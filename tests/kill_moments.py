"""Stop `python -m qala.train` at one chosen moment, for kill -9 tests (issue 20).

    python -m tests.kill_moments ROOT LOG MOMENT MARKER RECIPE [qala.train arguments ...]
    start(ROOT, LOG, MOMENT, MARKER, [RECIPE, ...])   # the same, forked from a process that imported qala.train

Runs qala.train with its file operations under ROOT (the run's output folder) and its optimizer steps
numbered as moments: each write (by open(), torch.save or safetensors) `before` it starts, `partial` (the
file cut to its first half, as a kill half way through the write leaves it) and `after`; each folder
deletion `before`, `partial` (half its files gone) and `after`; each rename `before` and `after`; each
optimizer step `at` its start. Every moment reached is appended to LOG as `INDEX<TAB>PHASE<TAB>WHAT`, WHAT
naming paths relative to ROOT with the random part of temporary names as `~`. When the moment MOMENT is
reached (an INDEX of an uninterrupted run's LOG, or `PHASE WHAT` as LOG spells it), the process touches
MARKER and waits there, for tests.conftest.kill_9_when to SIGKILL it: the kill lands exactly at that
moment. A timer cannot do that: a tiny run's steps and checkpoint writes take ~50 ms. MOMENT `-` runs to
the end, only logging.
"""

from __future__ import annotations

import builtins
import io
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path

_open, _io_open, _replace, _rmtree = builtins.open, io.open, os.replace, shutil.rmtree
# The random part of tempfile names (atomic writes and folders of qala.utils: .NAME.XXXXXXXX.tmp).
_TEMPORARY = re.compile(r"\.[a-z0-9_]{8}\.tmp(?=/|\.|$)")


class Moments:
    def __init__(self, root: str, log: str, target: str, marker: str) -> None:
        self.root = os.path.realpath(root)
        self.log = _open(log, "a", buffering=1)
        self.target, self.marker, self.index = target, marker, 0

    def name(self, path) -> str | None:
        """`path` relative to ROOT, or None for a path outside it (or a file descriptor)."""
        if not isinstance(path, (str, os.PathLike)):
            return None
        full = os.path.realpath(path)
        if not full.startswith(self.root + os.sep):
            return None
        return _TEMPORARY.sub(".~.tmp", Path(full).relative_to(self.root).as_posix())

    def reached(self, phase: str, what: str, before_stop=None) -> None:
        self.log.write(f"{self.index}\t{phase}\t{what}\n")
        hit = self.target in (str(self.index), f"{phase} {what}")
        self.index += 1
        if hit:
            if before_stop is not None:
                before_stop()
            _open(self.marker, "w").close()
            time.sleep(3600)  # kill_9_when's SIGKILL lands here
            os._exit(3)

    def wrote(self, path, what: str) -> None:
        """The moments of a file written whole at `path`: cut to half its bytes, then complete."""
        self.reached("partial", what, lambda: os.truncate(path, os.path.getsize(path) // 2))
        self.reached("after", what)


def install(moments: Moments) -> None:
    import safetensors.torch
    import torch
    import transformers.modeling_utils

    import qala.model
    import qala.train

    class Written:
        """A file opened for writing under ROOT: its partial and after moments come when it is closed."""

        def __init__(self, file, path, what: str) -> None:
            self._file, self._path, self._what = file, path, what

        def __getattr__(self, key):
            return getattr(self._file, key)

        def __iter__(self):
            return iter(self._file)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self) -> None:
            if not self._file.closed:
                self._file.close()
                moments.wrote(self._path, f"write {self._what}")

    def hooked_open(original):
        def open_(file, mode="r", *args, **kwargs):
            what = moments.name(file) if any(c in mode for c in "wax+") else None
            if what is None:
                return original(file, mode, *args, **kwargs)
            moments.reached("before", f"write {what}")
            return Written(original(file, mode, *args, **kwargs), file, what)

        return open_

    def hooked_save(original):
        def save(obj, path, *args, **kwargs):
            what = moments.name(path)
            if what is None:
                return original(obj, path, *args, **kwargs)
            moments.reached("before", f"write {what}")
            result = original(obj, path, *args, **kwargs)
            moments.wrote(path, f"write {what}")
            return result

        return save

    def rmtree(path, *args, **kwargs):
        what = moments.name(path)
        if what is None or not os.path.isdir(path):
            return _rmtree(path, *args, **kwargs)

        def delete_half() -> None:
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for file in files[: len(files) // 2]:
                file.unlink()

        moments.reached("before", f"delete {what}")
        moments.reached("partial", f"delete {what}", delete_half)
        _rmtree(path, *args, **kwargs)
        moments.reached("after", f"delete {what}")

    def replace(src, dst, *args, **kwargs):
        what = moments.name(dst)
        if what is None:
            return _replace(src, dst, *args, **kwargs)
        moments.reached("before", f"rename {moments.name(src)} -> {what}")
        _replace(src, dst, *args, **kwargs)
        moments.reached("after", f"rename {moments.name(src)} -> {what}")

    training_step = qala.train.QalaTrainer.training_step

    def step(self, *args, **kwargs):
        moments.reached("at", f"step {self.state.global_step + 1}")
        return training_step(self, *args, **kwargs)

    builtins.open, io.open = hooked_open(_open), hooked_open(_io_open)
    torch.save = hooked_save(torch.save)
    # transformers saves weights through its own name for safetensors' save_file.
    transformers.modeling_utils.safe_save_file = hooked_save(transformers.modeling_utils.safe_save_file)
    safetensors.torch.save_file = hooked_save(safetensors.torch.save_file)
    qala.model.save_file = hooked_save(qala.model.save_file)  # a stage's model
    shutil.rmtree, os.replace = rmtree, replace
    qala.train.QalaTrainer.training_step = step


def read_log(path: str | Path) -> list[tuple[int, str, str]]:
    """The moments a LOG lists: (index, phase, what)."""
    rows = [line.split("\t") for line in Path(path).read_text().splitlines() if line]
    return [(int(index), phase, what) for index, phase, what in rows]


def run(root: str, log: str, moment: str, marker: str, args: list[str]) -> None:
    """The process: qala.train.main(args), stopping at `moment`; exits with its exit code."""
    install(Moments(root, log, moment, marker))
    import qala.train

    sys.exit(qala.train.main(args))


def start(root, log, moment: str, marker, args: list) -> multiprocessing.process.BaseProcess:
    """`run` in a process forked from a server that imported qala.train once (multiprocessing's forkserver,
    started from the current folder): a run starts at once, not after ~10-20 s of imports, and each is a
    fresh process that never trained before it forked."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["qala.train", "tests.kill_moments"])
    process = context.Process(target=run, args=(str(root), str(log), moment, str(marker), [str(a) for a in args]))
    process.start()
    return process


if __name__ == "__main__":
    root, log, moment, marker, *args = sys.argv[1:]
    run(root, log, moment, marker, args)
