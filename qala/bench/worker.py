"""Measure one benchmark row in this process and write its result JSON.

    python -m qala.bench.worker SPEC.json OUT        # OUT: a file, or a folder (OUT/worker-<pid>.json)

The harness (qala.bench.cli) starts one worker per row, so peak resident memory is the row's own and
no row inherits another's threads, allocator state or compiled graphs; torch's run_cpu launcher
starts it per instance in the core sweep. A row may name another Python (`python` in its spec, e.g.
the IPEX environment's): the worker then runs under that interpreter, so this module imports only
what the row's kind needs.

Spec kinds: "gemm_peak" (qala.bench.roofline), "real_questions" (qala.bench.questions), and the
padded table's rows (KIND_ENGINES: the engine of qala.bench.peers each kind runs on).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qala.utils import atomic_write_json, time_calls

logger = logging.getLogger(__name__)

# The padded table's row kinds (what bench.json records) and the engine each runs on.
KIND_ENGINES = {
    "transformers": "transformers",  # random weights, a published shape
    "length_adaptive_random": "qala",  # random weights with qala's token dropping (Dynamic-TinyBERT)
    "fp32_dir": "qala",
    "int8_dir": "qala",
    "onnxruntime": "onnxruntime",  # qala's adaptive graph at the row's length configuration
    "ipex": "ipex",
}


def load_inputs(path: str | Path) -> dict[str, Any]:
    """The benchmark's padded windows (inputs.safetensors written by the harness)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def make_batch(inputs: Mapping[str, Any], batch_size: int, start: int = 0) -> dict[str, Any]:
    """`batch_size` windows from `start`, tiling the windows when there are fewer."""
    import torch

    n = inputs["input_ids"].size(0)
    index = torch.tensor([(start + i) % n for i in range(batch_size)])
    return {k: v.index_select(0, index).contiguous() for k, v in inputs.items()}


def measure(
    call: Callable[[Mapping[str, Any]], Any],
    inputs: Mapping[str, Any],
    batch_size: int,
    *,
    warmup: int,
    repeats: int,
    min_repeats: int,
    max_seconds: float,
    vary_inputs: bool = False,
) -> tuple[dict[str, Any], float]:
    """Time `call(batch)` with qala.utils.time_calls; returns (summary, seconds of the first call, which
    includes any compilation of this shape)."""
    from qala.bench.report import summarize

    # Batch-1 latency cycles through different windows (real inputs differ in how many tokens are real);
    # larger batches reuse one batch.
    distinct = min(repeats, inputs["input_ids"].size(0)) if vary_inputs else 1
    batches = [make_batch(inputs, batch_size, start=i * batch_size) for i in range(distinct)]
    first = time_calls(lambda: call(batches[0]), warmup=0, repeats=1)[0]
    turn = itertools.count()
    seconds = time_calls(
        lambda: call(batches[next(turn) % len(batches)]),
        warmup=max(warmup - 1, 0),
        repeats=repeats,
        min_repeats=min_repeats,
        max_seconds=max_seconds,
    )
    return summarize(seconds, batch_size), first


def measure_padded_row(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every batch size of one padded-table row."""
    from qala.bench.peers import ENGINES

    if spec["kind"] not in KIND_ENGINES:
        raise ValueError(f"unknown row kind {spec['kind']!r}")
    inputs = load_inputs(spec["inputs"])
    started = time.perf_counter()
    # Engines that trace per shape (IPEX) build the first batch size's graph while loading.
    example = make_batch(inputs, spec["batch_sizes"][0])
    call, facts = ENGINES[KIND_ENGINES[spec["kind"]]](spec, Path(spec["work_dir"]), example)
    result: dict[str, Any] = {**facts, "load_seconds": round(time.perf_counter() - started, 2)}
    batches, first_call = {}, {}
    for b in spec["batch_sizes"]:
        latency = b == 1 and not spec.get("throughput_only")
        summary, first = measure(
            call,
            inputs,
            b,
            warmup=spec["warmup"],
            repeats=spec["latency_repeats"] if latency else spec["repeats"],
            min_repeats=spec["min_repeats"],
            max_seconds=spec["max_seconds_per_measurement"],
            vary_inputs=latency,
        )
        batches[str(b)] = summary
        first_call[str(b)] = round(first, 3)
    return {**result, "batches": batches, "first_call_seconds": first_call}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a
    worker started by a large parent would report the parent's peak; VmHWM belongs to the new address space."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(spec_file: str | Path, out: str | Path) -> int:
    """Measure the row spec in `spec_file` and write its result JSON to `out` (a file or a folder)."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    out = Path(out)
    if out.is_dir():
        out = out / f"worker-{os.getpid()}.json"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result: dict[str, Any] = {"id": spec["id"], "threads": torch.get_num_threads(), "pid": os.getpid()}
    started = time.perf_counter()
    if spec["kind"] == "gemm_peak":
        from qala.bench.roofline import gemm_peak

        result.update(gemm_peak(spec.get("threads"), spec.get("gemm_size", 2048)))
    elif spec["kind"] == "real_questions":
        from qala.bench.questions import measure_questions

        result.update(measure_questions(spec))
    else:
        result.update(measure_padded_row(spec))
    result["peak_rss_mb"] = peak_rss_mb()
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m qala.bench.worker SPEC.json OUT", file=sys.stderr)
        return 2
    # Quiet: the harness shows a failed worker's last stderr lines as the row's error.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args[0], args[1])


if __name__ == "__main__":
    sys.exit(main())
