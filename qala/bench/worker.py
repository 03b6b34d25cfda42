"""Measure one benchmark row in this process and write its result JSON.

    python -m qala.bench.worker SPEC.json OUT        # OUT: a file, or a folder (OUT/worker-<pid>.json)

The harness (qala.bench.cli) starts one worker per row, so peak resident memory is the row's own and
no row inherits another's threads, allocator state or compiled graphs; torch's run_cpu launcher
starts it per instance in the core sweep. A row may name another Python (`python` in its spec, e.g.
the IPEX environment's): the worker then runs under that interpreter, so this module imports only
what the row's kind needs.

Spec kinds: "gemm_peak" (qala.bench.roofline), "real_questions" (qala.bench.questions), and the
padded table's rows ("transformers", "length_adaptive_random", "fp32_dir", "int8_dir", "onnxruntime", "ipex").
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

from qala.utils import atomic_write_json, directory_bytes, time_calls

logger = logging.getLogger(__name__)


def load_inputs(path: str | Path, vocab_size: int | None = None) -> dict[str, Any]:
    """The benchmark's padded windows (inputs.safetensors written by the harness)."""
    from safetensors.torch import load_file

    inputs = load_file(str(path))
    if vocab_size is not None:
        # Random-weight architectures may have a smaller vocabulary than the tokenizer (tests); ids do not
        # change the cost of a forward pass.
        inputs["input_ids"] = inputs["input_ids"].clamp(max=vocab_size - 1)
    return inputs


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


def build_row(spec: Mapping[str, Any], work_dir: Path) -> tuple[Callable, dict[str, Any], int | None]:
    """(call(batch) -> outputs, facts about the row, vocabulary size for clamping ids) of a padded row."""
    from qala.bench.peers import call_model, onnx_row, random_model

    kind, lengths = spec["kind"], spec["length_config"]
    if kind in ("transformers", "length_adaptive_random"):
        adaptive = kind == "length_adaptive_random"
        model = random_model(spec["arch"], length_adaptive=adaptive)
        facts: dict[str, Any] = {
            "attn_implementation": "eager (token selection reads attention probabilities)"
            if adaptive
            else model.config._attn_implementation,
            "size_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "size_kind": "parameter_bytes",
        }
        kwargs = {"length_config": lengths} if adaptive else {}
        return (lambda batch: call_model(model, batch, **kwargs)), facts, model.config.vocab_size
    if kind == "onnxruntime":
        return onnx_row(spec, work_dir, {})
    if kind == "ipex":
        # Runs under .venv-ipex's python (torch 2.8): the INT8 model benchmarks/ipex_quantize.py calibrated and
        # scored, one frozen trace per (configuration, shape); a batch size's first call builds its trace
        # (reported as first_call_seconds, never timed).
        from qala.quantize.ipex import timing_callable

        example = make_batch(load_inputs(spec["inputs"]), spec["batch_sizes"][0])
        ipex_call, facts = timing_callable(spec["path"], lengths, example, summaries=spec["ipex_summaries"])
        facts.update(size_bytes=directory_bytes(spec["path"]), size_kind="directory (fp32 model + calibration)")
        return ipex_call, facts, None
    if kind in ("fp32_dir", "int8_dir"):
        from qala.quantize.load import load_model

        compiled = spec["dtype"] == "int8" and bool(spec.get("compile", True))
        model = load_model(spec["path"], compiled=compiled, expect=spec["dtype"])
        facts = {"size_bytes": directory_bytes(spec["path"]), "size_kind": "directory"}
        if spec["dtype"] == "int8":
            facts["compiled"] = compiled
        return (lambda batch: call_model(model, batch, length_config=lengths)), facts, None
    raise ValueError(f"unknown row kind {kind!r}")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a
    worker started by a large parent would report the parent's peak; VmHWM belongs to the new address space."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure_padded_row(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every batch size of one padded-table row."""
    started = time.perf_counter()
    call, facts, vocab = build_row(spec, Path(spec["work_dir"]))
    result: dict[str, Any] = {**facts, "load_seconds": round(time.perf_counter() - started, 2)}
    inputs = load_inputs(spec["inputs"], vocab)
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
    result["batches"] = batches
    result["first_call_seconds"] = first_call
    return result


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
