"""Benchmark harness: throughput, latency, memory, size and roofline of every row, in one run.

    python -m qala.bench RECIPE.yaml [key.sub=value ...] [--resume]

A row is one model, dtype and length configuration: BERT-base fp32 (the 1x), TinyBERT-6L and
Dynamic-TinyBERT (architectures with random weights: speed does not depend on the weights), our
MiniLM fp32 and INT8 at full length, the QuaLA configurations of a search frontier (fp32 and INT8),
and the ONNX Runtime peers. Each row runs in its own worker process (`--worker`, internal), so peak
resident memory is the row's own and no row inherits another's threads, allocator state or compiled
graphs. Inputs are real evaluation windows of `data.eval`, padded to data.max_seq_length.

OUTPUT_DIR/bench.json   environment, CPU flags, method, every row (rewritten after each row)
OUTPUT_DIR/bench.md     the table in the paper's shape
OUTPUT_DIR/f1_vs_speedup.png, throughput_vs_cores.png
A killed run keeps every row it finished; `--resume` skips rows already measured for the same recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qala.utils import directory_bytes

logger = logging.getLogger(__name__)

BENCH_NAME = "bench.json"
TABLE_NAME = "bench.md"
INPUTS_NAME = "inputs.safetensors"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
REFERENCE_ID = "BERT-base/fp32/full"

# The published shapes (transformers.BertConfig defaults are BERT-base: 12 layers, hidden 768, FFN 3072,
# 12 heads). TinyBERT-6L is "6 layers, a hidden size of 768, a feed forward size of 3072 and 12 heads"
# (Intel/dynamic_tinybert model card, quoting Guskin et al. 2021); Dynamic-TinyBERT is that shape with
# token dropping.
BASELINE_SHAPES: dict[str, dict[str, Any]] = {
    "bert-base": {},
    "tinybert-6l": {"num_hidden_layers": 6},
    "dynamic-tinybert": {"num_hidden_layers": 6},
}
BASELINE_NAMES = {"bert-base": "BERT-base", "tinybert-6l": "TinyBERT-6L", "dynamic-tinybert": "Dynamic-TinyBERT"}

# Published accuracy of the architecture-only rows (SQuAD 1.1 dev F1). None where no figure could be
# checked: a number we could not verify is not shown.
PUBLISHED_F1: dict[str, dict[str, Any]] = {
    "bert-base": {
        "f1": 88.5,
        "source": "Devlin et al. 2019, BERT, Table 2: BERT-BASE (single) SQuAD 1.1 dev F1 88.5",
    },
    "tinybert-6l": {
        "f1": None,
        "source": "TinyBERT (Jiao et al. 2020) reports SQuAD 1.1 for its 6-layer model, but the figure could "
        "not be checked when this harness was written, so it is left empty",
    },
    "dynamic-tinybert": {
        "f1": 88.71,
        "source": "Intel/dynamic_tinybert model card (model-index, SQuAD 1.1 F1 88.71); the card does not state "
        "the length configuration that F1 was measured at",
    },
}
# Guskin et al. 2021 (arXiv 2111.09645): "up to 3.3x with <1% loss-drop" over BERT-base. No per-layer
# length configuration is published, so the row uses the constant keep ratio whose MACs come closest to
# 3.3x fewer than BERT-base's (see dynamic_tinybert_length_config).
DYNAMIC_TINYBERT_SPEEDUP = 3.3

IPEX_BUILD = (
    "python3 -m venv .venv-ipex && .venv-ipex/bin/pip install torch==2.8.* intel-extension-for-pytorch==2.8.* -e ."
)


# --------------------------------------------------------------------------- statistics and reports


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(seconds: Sequence[float], batch_size: int) -> dict[str, Any]:
    """Median, percentiles and throughput of timed calls of one batch size."""
    ms = [s * 1000 for s in seconds]
    median = statistics.median(ms)
    return {
        "batch_size": batch_size,
        "repeats": len(ms),
        "median_ms": round(median, 3),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
        "samples_per_s": round(batch_size * 1000 / median, 3),
    }


def add_derived(rows: list[dict[str, Any]], peaks: Mapping[str, Any] | None) -> None:
    """Speedups against the BERT-base row of the same run and the roofline columns, in place."""
    reference = next((r for r in rows if r["id"] == REFERENCE_ID and r.get("status") == "ok"), None)
    for row in rows:
        if row.get("status") != "ok":
            continue
        throughput = {str(b): m["samples_per_s"] for b, m in row["batches"].items()}
        if reference is not None:
            ref = {str(b): m["samples_per_s"] for b, m in reference["batches"].items()}
            row["speedup_vs_bert_base"] = {b: round(t / ref[b], 3) for b, t in throughput.items() if ref.get(b)}
        else:
            row["speedup_vs_bert_base"] = None
        macs = row.get("macs_per_sample")
        if macs:
            row["achieved_gmacs_per_s"] = {b: round(macs * t / 1e9, 3) for b, t in throughput.items()}
            peak = (peaks or {}).get(f"{'int8' if row['dtype'] == 'int8' else 'fp32'}_gmacs_per_s")
            row["peak_fraction"] = (
                {b: round(g / peak, 4) for b, g in row["achieved_gmacs_per_s"].items()} if peak else None
            )


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def format_table(document: Mapping[str, Any]) -> str:
    """Markdown table in the paper's shape: one line per measured row."""
    sizes = [str(b) for b in document["method"]["batch_sizes"]]
    first, last = sizes[0], sizes[-1]
    header = (
        ["model", "dtype", "length config", "size MB", "F1", f"b{first} p50 ms"]
        + [f"samples/s b{b}" for b in sizes]
        + ["GMACs/sample", f"% of peak b{last}", f"speedup b{first}", f"speedup b{last}"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in document["rows"]:
        if row.get("status") != "ok":
            continue
        f1 = _fmt(row.get("f1"), 2)
        if row.get("f1") is not None and row.get("f1_published"):
            f1 += " (published)"
        lengths = "full" if row.get("length_config") is None else ",".join(map(str, row["length_config"]))
        size = _fmt((row.get("size_bytes") or 0) / 1e6 if row.get("size_bytes") else None, 1)
        if row.get("size_kind") == "parameter_bytes":
            size += " (params)"
        batches = row["batches"]
        speed = row.get("speedup_vs_bert_base") or {}
        peak = (row.get("peak_fraction") or {}).get(last)
        cells = [
            row["name"],
            row["dtype"],
            lengths,
            size,
            f1,
            _fmt(batches.get(first, {}).get("p50_ms"), 1),
            *[_fmt(batches.get(b, {}).get("samples_per_s"), 2) for b in sizes],
            _fmt(row["macs_per_sample"] / 1e9 if row.get("macs_per_sample") else None, 2),
            _fmt(peak * 100 if peak is not None else None, 1, "%"),
            _fmt(speed.get(first), 2, "x"),
            _fmt(speed.get(last), 2, "x"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Threads per row: {document['method']['threads']}; batch {first} latency from "
        f"{document['method']['latency_repeats']} timed calls, other batches the median of up to "
        f"{document['method']['repeats']} after {document['method']['warmup']} warm-up calls. "
        "Speedups are throughput ratios against BERT-base fp32 measured in the same run.",
    ]
    failed = [r for r in document["rows"] if r.get("status") != "ok"]
    notes += [f"- {r['id']}: {r.get('status')}: {str(r.get('error', ''))[:200]}" for r in failed]
    return "\n".join(lines + notes) + "\n"


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark hosts
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def plot_f1_vs_speedup(document: Mapping[str, Any], path: str | Path) -> bool:
    """F1 versus speedup (largest batch) of every row that has both; False when there is nothing to plot."""
    last = str(document["method"]["batch_sizes"][-1])
    points = [
        (r["speedup_vs_bert_base"][last], r["f1"], r)
        for r in document["rows"]
        if r.get("status") == "ok" and r.get("f1") is not None and (r.get("speedup_vs_bert_base") or {}).get(last)
    ]
    if not points:
        return False
    fig, ax = _figure()
    for dtype, marker in (("fp32", "o"), ("int8", "s")):
        chosen = [(x, y, r) for x, y, r in points if r["dtype"] == dtype]
        if chosen:
            ax.scatter([x for x, _, _ in chosen], [y for _, y, _ in chosen], marker=marker, label=dtype)
    for x, y, r in points:
        ax.annotate(r["name"] + (" *" if r.get("f1_published") else ""), (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"throughput speedup vs BERT-base fp32, batch {last}")
    ax.set_ylabel("SQuAD F1 (* published)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_throughput_vs_cores(document: Mapping[str, Any], path: str | Path) -> bool:
    sweep = [s for s in (document.get("core_sweep") or {}).get("runs", []) if s.get("status") == "ok"]
    if not sweep:
        return False
    fig, ax = _figure()
    for row_id in dict.fromkeys(s["row"] for s in sweep):
        for n in sorted({s["ninstances"] for s in sweep if s["row"] == row_id}):
            runs = sorted(
                (s for s in sweep if s["row"] == row_id and s["ninstances"] == n), key=lambda s: s["total_cores"]
            )
            ax.plot(
                [s["total_cores"] for s in runs],
                [s["total_samples_per_s"] for s in runs],
                "o-" if n == 1 else "s--",
                label=f"{row_id} ({n} instance{'s' if n > 1 else ''})",
            )
    ax.set_xlabel("cores")
    ax.set_ylabel(f"samples/s, batch {document['core_sweep']['batch_size']}")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- planning the rows


def dynamic_tinybert_length_config(config: Any, reference: Any, seq_length: int) -> tuple[list[int], float]:
    """(length configuration, keep ratio): the constant keep ratio, in steps of 0.01, whose MACs are closest
    to BERT-base's divided by the published 3.3x."""
    from qala.model import constant_ratio_length_config, macs_per_sample

    target = macs_per_sample(reference, None, seq_length) / DYNAMIC_TINYBERT_SPEEDUP
    best = None
    for step in range(30, 101):
        ratio = step / 100
        lengths = constant_ratio_length_config(ratio, config.num_hidden_layers, seq_length)
        gap = abs(macs_per_sample(config, lengths, seq_length) - target)
        if best is None or gap < best[0]:
            best = (gap, lengths, ratio)
    return best[1], best[2]


def pick_frontier(
    frontier: Sequence[Mapping[str, Any]], n: int, full_f1: float | None = None, seq_length: int | None = None
) -> list[Mapping[str, Any]]:
    """Up to n frontier points: the cheapest within 1% relative F1 of the full model (when its F1 is known),
    the most accurate, the cheapest, then evenly spaced between, ordered by cost. The full-length point
    (every layer at seq_length) is left out: the MiniLM rows already measure it."""
    points = sorted(
        (p for p in frontier if seq_length is None or min(p["length_config"]) < seq_length), key=lambda p: p["cost"]
    )
    if n <= 0 or not points:
        return []
    chosen: list[int] = []
    if full_f1 is not None:
        near = [i for i, p in enumerate(points) if p["f1"] >= 0.99 * full_f1]
        if near:
            chosen.append(near[0])
    best = max(range(len(points)), key=lambda i: points[i]["f1"])
    for i in [best, 0, *[round(k * (len(points) - 1) / max(n - 1, 1)) for k in range(n)]]:
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return [points[i] for i in sorted(chosen)]


def row_id(name: str, dtype: str, length_config: Sequence[int] | None) -> str:
    return f"{name}/{dtype}/{'full' if length_config is None else 'lc-' + '-'.join(map(str, length_config))}"


def _read_json(path: str | Path | None) -> Any:
    return json.loads(Path(path).read_text()) if path else None


def _nested(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def plan_rows(recipe: Any, bench: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row spec to measure, in order, and what the plan was built from (frontier choice, skipped peers)."""
    from transformers import AutoConfig, BertConfig

    from qala.model import macs_per_sample
    from qala.utils import resolve_model_path

    seq = recipe.data.max_seq_length
    threads = bench.threads or os.cpu_count() or 1
    common = {
        "seq_length": seq,
        "batch_sizes": list(bench.batch_sizes),
        "threads": threads,
        "warmup": bench.warmup,
        "repeats": bench.repeats,
        "latency_repeats": bench.latency_repeats,
        "min_repeats": bench.min_repeats,
        "max_seconds_per_measurement": bench.max_seconds_per_measurement,
    }
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}

    def add(name: str, kind: str, dtype: str, config: Any, length_config: Sequence[int] | None, **extra) -> None:
        lengths = list(length_config) if length_config is not None else None
        rows.append(
            {
                "id": row_id(name, dtype, lengths),
                "name": name,
                "kind": kind,
                "dtype": dtype,
                "length_config": lengths,
                "macs_per_sample": macs_per_sample(config, lengths, seq),
                **common,
                **extra,
            }
        )

    shapes = {
        name: BertConfig(**{**BASELINE_SHAPES[name], **bench.baseline_configs.get(name, {})})
        for name in BASELINE_SHAPES
    }
    for name in bench.baselines:
        published = PUBLISHED_F1[name]
        extra = {
            "arch": shapes[name].to_diff_dict(),
            "f1": published["f1"],
            "f1_published": True,
            "f1_source": published["source"],
        }
        if name == "dynamic-tinybert":
            lengths, ratio = dynamic_tinybert_length_config(shapes[name], shapes["bert-base"], seq)
            extra["length_config_source"] = (
                f"no per-layer configuration is published; constant keep ratio {ratio} (each layer keeps {ratio} "
                f"of the previous layer's tokens), chosen as the ratio whose MACs are closest to BERT-base's / "
                f"{DYNAMIC_TINYBERT_SPEEDUP} (the paper's 'up to 3.3x with <1% loss-drop', arXiv 2111.09645)"
            )
            add(BASELINE_NAMES[name], "length_adaptive_random", "fp32", shapes[name], lengths, **extra)
        else:
            add(BASELINE_NAMES[name], "transformers", "fp32", shapes[name], None, **extra)

    fp32_f1 = _nested(_read_json(bench.fp32_eval), "results", "full", "f1")
    int8_f1 = _nested(_read_json(bench.int8_report), "final", "rows", "full", "int8", "f1")
    model_dir = resolve_model_path(bench.model) if bench.model else None
    int8_dir = resolve_model_path(bench.int8_model) if bench.int8_model else None
    config = AutoConfig.from_pretrained(model_dir or int8_dir) if (model_dir or int8_dir) else None

    def measured(f1: float | None, source: str | None) -> dict[str, Any]:
        return {"f1": f1, "f1_published": False, "f1_source": source if f1 is not None else None}

    if model_dir:
        add("MiniLM", "fp32_dir", "fp32", config, None, path=model_dir, **measured(fp32_f1, bench.fp32_eval))
    if int8_dir:
        add(
            "MiniLM",
            "int8_dir",
            "int8",
            config,
            None,
            path=int8_dir,
            compile=bench.compile_int8,
            **measured(int8_f1, bench.int8_report),
        )

    frontier = _read_json(bench.frontier)
    chosen: list[Mapping[str, Any]] = []
    if frontier:
        chosen = pick_frontier(frontier.get("frontier", []), bench.max_frontier_rows, fp32_f1, seq_length=seq)
        notes["frontier"] = {
            "file": bench.frontier,
            "backend": frontier.get("backend"),
            "points": len(frontier.get("frontier", [])),
            "chosen": [list(p["length_config"]) for p in chosen],
            "f1_applies_to": frontier.get("backend"),
        }
        for point in chosen:
            for dtype in bench.frontier_dtypes:
                directory = model_dir if dtype == "fp32" else int8_dir
                if not directory:
                    continue
                source = f"{bench.frontier} (qala.search, {frontier.get('backend')})"
                f1 = point["f1"] if frontier.get("backend") == dtype else None
                kind = "fp32_dir" if dtype == "fp32" else "int8_dir"
                extra = {"compile": bench.compile_int8} if dtype == "int8" else {}
                add(
                    "QuaLA-MiniLM",
                    kind,
                    dtype,
                    config,
                    point["length_config"],
                    path=directory,
                    **extra,
                    **measured(f1, source),
                )

    if bench.onnxruntime and model_dir:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            notes["onnxruntime"] = {
                "status": "skipped",
                "reason": 'onnxruntime is not installed: pip install -e ".[onnx]"',
            }
        else:
            configs = [None] + ([list(chosen[0]["length_config"])] if chosen else [])
            for lengths in configs:
                for dtype in ("fp32", "int8"):
                    add(
                        "MiniLM-ONNXRuntime",
                        "onnxruntime",
                        dtype,
                        config,
                        lengths,
                        path=model_dir,
                        **measured(None, None),
                    )
    if bench.ipex:
        env = Path(".venv-ipex/bin/python")
        notes["ipex"] = {
            "status": "skipped",
            "reason": (
                "IPEX is retired at 2.8 and needs torch 2.8 in its own environment; "
                + (
                    f"{env} exists, but qala.bench does not drive it yet"
                    if env.exists()
                    else "no such environment here"
                )
            ),
            "build_command": IPEX_BUILD,
        }
    for row in rows:
        if row["id"] in bench.f1 and row.get("f1") is None:
            row.update(f1=float(bench.f1[row["id"]]), f1_published=False, f1_source="recipe benchmark.f1")
    return rows, notes


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the worker (one row, one process)


def load_inputs(path: str | Path, vocab_size: int | None = None) -> dict[str, Any]:
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
    """Time `call(batch)`: warm-up, then up to `repeats` timed calls (fewer when each is slow, never below
    min_repeats). Returns (summary, seconds of the first warm-up call, which includes any compilation)."""
    # Batch-1 latency cycles through different windows (real inputs differ in how many tokens are real);
    # larger batches reuse one batch.
    distinct = min(repeats, inputs["input_ids"].size(0)) if vary_inputs else 1
    batches = [make_batch(inputs, batch_size, start=i * batch_size) for i in range(distinct)]
    first = 0.0
    for i in range(max(warmup, 1)):
        start = time.perf_counter()
        call(batches[0])
        if i == 0:
            first = time.perf_counter() - start
    start = time.perf_counter()
    call(batches[0])
    one = time.perf_counter() - start
    count = max(min_repeats, min(repeats, int(max_seconds / max(one, 1e-9))))
    seconds = [one]
    for i in range(1, count):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        call(batch)
        seconds.append(time.perf_counter() - start)
    return summarize(seconds, batch_size), first


def build_row(spec: Mapping[str, Any], work_dir: Path) -> tuple[Callable, dict[str, Any], int | None]:
    """(call(batch) -> outputs, facts about the row, vocabulary size for clamping ids)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, BertConfig

    from qala.model import LengthAdaptiveForQuestionAnswering

    kind, lengths = spec["kind"], spec["length_config"]
    facts: dict[str, Any] = {}
    if kind in ("transformers", "length_adaptive_random"):
        config = BertConfig(**spec["arch"])
        torch.manual_seed(0)
        if kind == "transformers":
            model = AutoModelForQuestionAnswering.from_config(config).eval()
            facts["attn_implementation"] = model.config._attn_implementation
        else:
            model = LengthAdaptiveForQuestionAnswering.from_config(config).eval()
            facts["attn_implementation"] = "eager (token selection reads attention probabilities)"
        facts["size_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        facts["size_kind"] = "parameter_bytes"
        kwargs = {"length_config": lengths} if kind == "length_adaptive_random" else {}

        def call(batch):
            with torch.no_grad():
                return model(**batch, **kwargs)

        return call, facts, config.vocab_size

    facts["size_bytes"] = directory_bytes(spec["path"])
    facts["size_kind"] = "directory"
    if kind == "fp32_dir":
        model = LengthAdaptiveForQuestionAnswering.from_pretrained(spec["path"]).eval()

        def call(batch):
            with torch.no_grad():
                return model(**batch, length_config=lengths)

        return call, facts, None
    if kind == "int8_dir":
        from qala.quantize import CompiledQA, load_quantized

        compiled = CompiledQA(load_quantized(spec["path"]), compile=spec.get("compile", True))
        facts["compiled"] = compiled.compiled
        facts["compile_seconds"] = compiled.compile_seconds

        def call(batch):
            return compiled(length_config=lengths, **batch)

        return call, facts, None
    if kind == "onnxruntime":
        return _onnx_row(spec, work_dir, facts)
    raise ValueError(f"unknown row kind {kind!r}")


def _onnx_row(spec: Mapping[str, Any], work_dir: Path, facts: dict[str, Any]):
    """Export the fp32 model at a fixed length configuration (top-k sizes become constants), optionally
    quantize it with ONNX Runtime's dynamic INT8, and run it with as many intra-op threads as the others."""
    import onnxruntime as ort
    import torch

    from qala.model import LengthAdaptiveForQuestionAnswering

    model = LengthAdaptiveForQuestionAnswering.from_pretrained(spec["path"]).eval()
    lengths = spec["length_config"]

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids, attention_mask, token_type_ids, length_config=lengths)
            return out.start_logits, out.end_logits

    work_dir.mkdir(parents=True, exist_ok=True)
    fp32_file = work_dir / "model.onnx"
    seq = spec["seq_length"]
    example = tuple(torch.ones(2, seq, dtype=torch.long) for _ in MODEL_INPUTS)
    start = time.perf_counter()
    # The TorchScript exporter takes the top-k sizes as traced constants and keeps the batch dynamic;
    # the wrapper is put in eval mode explicitly (the exporter restores the training flag recursively).
    torch.onnx.export(
        Exported().eval(),
        example,
        str(fp32_file),
        input_names=list(MODEL_INPUTS),
        output_names=["start_logits", "end_logits"],
        dynamic_axes={name: {0: "batch"} for name in MODEL_INPUTS},
        dynamo=False,
    )
    facts["export_seconds"] = round(time.perf_counter() - start, 2)
    path = fp32_file
    if spec["dtype"] == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = work_dir / "model.int8.onnx"
        quantize_dynamic(str(fp32_file), str(path), weight_type=QuantType.QInt8)
        facts["quantization"] = "onnxruntime.quantization.quantize_dynamic, QInt8 weights"
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"] or 0
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    facts.update(size_bytes=path.stat().st_size, size_kind="onnx file", onnxruntime=ort.__version__)

    def call(batch):
        return session.run(None, {k: v.numpy() for k, v in batch.items()})

    return call, facts, None


def gemm_peak(threads: int | None, size: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """fp32 and INT8 GEMM throughput of this CPU (median GMAC/s over `repeats` square size x size products).

    INT8 goes through the path qala's INT8 model takes: a Linear quantized with torchao's
    X86InductorQuantizer (PT2E, 7-bit activations where the CPU lacks VNNI, as qala.quantize does),
    compiled by Inductor with freezing into a oneDNN qlinear kernel. torch._int_mm is measured too.
    """
    import torch

    from qala.quantize.units import resolve_reduce_range

    if threads:
        torch.set_num_threads(threads)
    macs = size**3
    result: dict[str, Any] = {"size": size, "threads": torch.get_num_threads(), "repeats": repeats}

    def rate(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(macs / statistics.median(times) / 1e9, 2)

    a, b = torch.randn(size, size), torch.randn(size, size)
    result["fp32_gmacs_per_s"] = rate(lambda: torch.mm(a, b))
    result["fp32_method"] = "torch.mm fp32"
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        reduce_range = resolve_reduce_range(None)
        linear = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)).eval()
        x = torch.randn(size, size)
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
        )
        prepared = prepare_pt2e(torch.export.export(linear, (x,)).module(), quantizer)
        prepared(x)
        converted = convert_pt2e(prepared)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(converted)
            result["int8_gmacs_per_s"] = rate(lambda: compiled(x))
        result["int8_method"] = (
            f"Linear({size},{size}) via torchao X86InductorQuantizer (reduce_range={reduce_range}) + "
            "torch.compile freezing (oneDNN qlinear, includes activation quantize/dequantize)"
        )
    except Exception as e:  # noqa: BLE001 - the fallback below is recorded with the reason
        result["int8_qlinear_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        qa = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        qb = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        result["int_mm_gmacs_per_s"] = rate(lambda: torch._int_mm(qa, qb))
        if "int8_gmacs_per_s" not in result:
            result["int8_gmacs_per_s"] = result["int_mm_gmacs_per_s"]
            result["int8_method"] = "torch._int_mm s8s8->s32 (the qlinear path failed, see int8_qlinear_error)"
    except RuntimeError as e:
        result["int_mm_error"] = str(e)[:300]
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a
    worker started by a large parent would report the parent's peak; VmHWM belongs to the new address space."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def worker(spec_file: str | Path, out: str | Path) -> int:
    """Measure one row spec and write its result JSON (`out`, or OUT/worker-<pid>.json when out is a folder)."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    out = Path(out)
    if out.is_dir():
        out = out / f"worker-{os.getpid()}.json"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result: dict[str, Any] = {"id": spec["id"], "threads": torch.get_num_threads(), "pid": os.getpid()}
    start = time.perf_counter()
    if spec["kind"] == "gemm_peak":
        result.update(gemm_peak(spec.get("threads"), spec.get("gemm_size", 2048)))
    else:
        call, facts, vocab = build_row(spec, Path(spec["work_dir"]))
        result.update(facts)
        result["load_seconds"] = round(time.perf_counter() - start, 2)
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
        if "compile_seconds" in result:
            result["compile_seconds"] = {str(k): round(v, 2) for k, v in result["compile_seconds"].items()}
    result["peak_rss_mb"] = peak_rss_mb()
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    from qala.utils import atomic_write_json

    atomic_write_json(out, result)
    return 0


# --------------------------------------------------------------------------- the run


def _libraries_found(names: Sequence[str]) -> bool:
    """Whether run_cpu would find one of these shared libraries (it searches the same folders)."""
    folders = [
        Path(sys.prefix) / "lib",
        Path.home() / ".local/lib",
        Path("/usr/local/lib"),
        Path("/usr/local/lib64"),
        Path("/usr/lib"),
        Path("/usr/lib64"),
        Path("/usr/lib/x86_64-linux-gnu"),
    ]
    return any((folder / name).exists() for folder in folders for name in names)


def run_cpu_command(
    spec_file: str | Path,
    out_dir: str | Path,
    *,
    ninstances: int,
    ncores_per_instance: int,
    numactl: bool | None = None,
    iomp: bool | None = None,
    allocator: bool | None = None,
) -> list[str]:
    """`python -m torch.backends.xeon.run_cpu ... --no-python python -m qala.bench --worker SPEC --out DIR`.

    Features whose tools are missing here (numactl, Intel OpenMP, tcmalloc/jemalloc) are switched off
    explicitly, so that the launcher neither fails nor silently changes what is measured."""
    numactl = shutil.which("numactl") is not None if numactl is None else numactl
    iomp = _libraries_found(["libiomp5.so"]) if iomp is None else iomp
    allocator = _libraries_found(["libtcmalloc.so", "libjemalloc.so"]) if allocator is None else allocator
    cmd = [
        sys.executable,
        "-m",
        "torch.backends.xeon.run_cpu",
        "--ninstances",
        str(ninstances),
        "--ncores-per-instance",
        str(ncores_per_instance),
    ]
    if not numactl:
        cmd.append("--disable-numactl")
    if not iomp:
        cmd.append("--disable-iomp")
    if not allocator:
        cmd.append("--use-default-allocator")
    # run_cpu's own -m refuses any program not ending in .py, so the interpreter is the program instead.
    return cmd + ["--no-python", sys.executable, "-m", "qala.bench", "--worker", str(spec_file), "--out", str(out_dir)]


def _tail(text: str, lines: int = 15) -> str:
    kept = [line for line in text.splitlines() if line.strip() and "Failed to load" not in line]
    return "\n".join(kept[-lines:])


def run_worker(spec: Mapping[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run one row in a fresh process; a failure becomes the row's status and error, never an exception."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = work_dir / "spec.json", work_dir / "result.json"
    from qala.utils import atomic_write_json

    atomic_write_json(spec_file, spec)
    out_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "qala.bench", "--worker", str(spec_file), "--out", str(out_file)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out_file.is_file():
        return {"status": "failed", "error": _tail(proc.stderr) or f"exit status {proc.returncode}"}
    return {"status": "ok", **json.loads(out_file.read_text())}


def cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    return []


def bench_fingerprint(recipe: Any) -> str:
    """What every row's inputs depend on (the windows and this host's thread default). Rows are matched on
    their own spec as well, so sweep, peer or budget settings may change between a run and its --resume."""
    b = recipe.benchmark
    data = {
        "data": dataclasses.asdict(recipe.data),
        "windows": b.windows,
        "gemm_size": b.gemm_size,
        "threads": b.threads or os.cpu_count(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_inputs(recipe: Any, bench: Any, path: Path) -> int:
    """Tokenize the first `bench.windows` evaluation windows (padded) into a safetensors file; returns N."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qala.data import load_split, windows
    from qala.utils import resolve_model_path

    source = bench.model or bench.int8_model or recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(source))
    data = dataclasses.replace(recipe.data, max_eval_samples=recipe.data.max_eval_samples or bench.windows)
    features = windows(load_split(data, "eval"), tokenizer, data, train=False)
    rows = features[: bench.windows]
    tensors = {c: torch.tensor(rows[c], dtype=torch.long) for c in MODEL_INPUTS if c in rows}
    if "token_type_ids" not in tensors:
        tensors["token_type_ids"] = torch.zeros_like(tensors["input_ids"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors["input_ids"].size(0)


class Bench:
    """One benchmark run: plan, measure row by row (saving after each), sweep cores, write the reports."""

    def __init__(self, recipe: Any, *, resume: bool = False) -> None:
        from qala.utils import environment_info

        self.recipe, self.bench = recipe, recipe.benchmark
        self.out = Path(self.bench.output_dir)
        self.started = time.monotonic()
        self.fingerprint = bench_fingerprint(recipe)
        previous = _read_json(self.out / BENCH_NAME) if resume and (self.out / BENCH_NAME).is_file() else None
        self.previous = {}
        if previous and previous.get("fingerprint") == self.fingerprint:
            self.previous = {r["id"]: r for r in previous.get("rows", []) if r.get("status") == "ok"}
            if (previous.get("gemm_peak") or {}).get("status") == "ok":
                self.previous["__gemm_peak__"] = previous["gemm_peak"]
        elif previous:
            logger.warning("--resume: %s is for another recipe; measuring everything again", self.out / BENCH_NAME)
        env = environment_info()
        with contextlib.suppress(Exception):
            import onnxruntime

            env["versions"]["onnxruntime"] = onnxruntime.__version__
        self.document: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "environment": {**env, "cpu_flags": cpu_flags()},
            "method": {},
            "rows": [],
            "gemm_peak": None,
            "core_sweep": None,
            "peers": {},
            "budget_exhausted": False,
        }

    def over_budget(self) -> bool:
        limit = self.bench.time_budget_minutes
        return limit is not None and (time.monotonic() - self.started) / 60 > limit

    def save(self) -> None:
        from qala.utils import atomic_write_json, atomic_write_text

        add_derived(self.document["rows"], self.document.get("gemm_peak"))
        self.document["wall_seconds"] = round(time.monotonic() - self.started, 1)
        atomic_write_json(self.out / BENCH_NAME, self.document)
        atomic_write_text(self.out / TABLE_NAME, format_table(self.document))

    def run(self) -> dict[str, Any]:
        b = self.bench
        self.out.mkdir(parents=True, exist_ok=True)
        inputs = self.out / INPUTS_NAME
        n = write_inputs(self.recipe, b, inputs)
        rows, notes = plan_rows(self.recipe, b)
        threads = b.threads or os.cpu_count() or 1
        self.document["method"] = {
            "windows": n,
            "data": self.recipe.data.eval,
            "seq_length": self.recipe.data.max_seq_length,
            "batch_sizes": list(b.batch_sizes),
            "threads": threads,
            "instances": 1,
            "warmup": b.warmup,
            "repeats": b.repeats,
            "latency_repeats": b.latency_repeats,
            "min_repeats": b.min_repeats,
            "max_seconds_per_measurement": b.max_seconds_per_measurement,
            "statistic": "median of timed calls per batch size; batch-1 latency p50/p90/p99 over latency_repeats "
            "calls cycling through the windows; throughput = batch / median; one worker process per row",
            "peak_memory": "VmHWM of the row's worker process (imports, model load, compilation and runs)",
        }
        self.document["peers"] = notes
        if b.gemm_peak:
            self.document["gemm_peak"] = self.previous.get("__gemm_peak__") or self._gemm_peak(threads)
            self.save()
        for i, spec in enumerate(rows, 1):
            spec = {**spec, "inputs": str(inputs), "work_dir": str(self.out / "work" / _slug(spec["id"]))}
            digest = spec_hash({k: v for k, v in spec.items() if k not in ("inputs", "work_dir")})
            done = self.previous.get(spec["id"])
            if done and done.get("spec_hash") == digest:
                logger.info("[%d/%d] %s: measured before (--resume), kept", i, len(rows), spec["id"])
                self.document["rows"].append(done)
                continue
            if self.over_budget():
                self.document["budget_exhausted"] = True
                self.document["rows"].append({**_public(spec), "status": "skipped", "error": "time budget exhausted"})
                continue
            logger.info("[%d/%d] %s ...", i, len(rows), spec["id"])
            result = run_worker(spec, Path(spec["work_dir"]))
            row = {**_public(spec), "spec_hash": digest, **result}
            self.document["rows"].append(row)
            self.save()
            logger.info("[%d/%d] %s: %s", i, len(rows), spec["id"], _progress_line(row))
        if b.core_sweep:
            self.document["core_sweep"] = self._core_sweep(rows, inputs)
        self.save()
        plot_f1_vs_speedup(self.document, self.out / "f1_vs_speedup.png")
        plot_throughput_vs_cores(self.document, self.out / "throughput_vs_cores.png")
        return self.document

    def _gemm_peak(self, threads: int) -> dict[str, Any]:
        spec = {"id": "gemm_peak", "kind": "gemm_peak", "threads": threads, "gemm_size": self.bench.gemm_size}
        logger.info("GEMM peak (fp32 and INT8) at %d threads ...", threads)
        return run_worker(spec, self.out / "work" / "gemm_peak")

    def _core_sweep(self, rows: list[dict[str, Any]], inputs: Path) -> dict[str, Any]:
        """Throughput at sweep_batch_size versus cores (1 instance) and versus instances (all cores split)."""
        b = self.bench
        total = os.cpu_count() or 1
        measured = {r["id"]: r for r in self.document["rows"] if r.get("status") == "ok"}
        int8 = [r for r in measured.values() if r["dtype"] == "int8" and r["kind"] == "int8_dir"]
        targets = [r for r in rows if r["id"] == REFERENCE_ID]
        if int8:
            best = max(int8, key=lambda r: r["batches"][str(b.batch_sizes[-1])]["samples_per_s"])
            targets += [r for r in rows if r["id"] == best["id"]]
        points = [(1, c) for c in (b.cores or range(1, total + 1)) if c <= total]
        points += [(n, total // n) for n in b.instances if n > 1 and total // n >= 1]
        sweep: dict[str, Any] = {
            "batch_size": b.sweep_batch_size,
            "repeats": b.sweep_repeats,
            "host_cores": total,
            "aggregation": "instances start together and each times its own calls; "
            "total samples/s = sum over instances",
            "runs": [],
        }
        for spec in targets:
            for ninstances, cores in points:
                if self.over_budget():
                    self.document["budget_exhausted"] = True
                    sweep["runs"].append(
                        {
                            "row": spec["id"],
                            "ninstances": ninstances,
                            "status": "skipped",
                            "error": "time budget exhausted",
                        }
                    )
                    continue
                sweep["runs"].append(self._sweep_point(spec, inputs, ninstances, cores))
                self.document["core_sweep"] = sweep
                self.save()
        return sweep

    def _sweep_point(self, spec: Mapping[str, Any], inputs: Path, ninstances: int, cores: int) -> dict[str, Any]:
        b = self.bench
        work = self.out / "work" / "sweep" / f"{_slug(spec['id'])}-{ninstances}x{cores}"
        results = work / "results"
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        point = {
            **spec,
            "inputs": str(inputs),
            "work_dir": str(work / "model"),
            "threads": None,
            "batch_sizes": [b.sweep_batch_size],
            "repeats": b.sweep_repeats,
            "min_repeats": b.sweep_repeats,
            "warmup": 1,
            "throughput_only": True,
        }
        from qala.utils import atomic_write_json

        atomic_write_json(work / "spec.json", point)
        cmd = run_cpu_command(work / "spec.json", results, ninstances=ninstances, ncores_per_instance=cores)
        logger.info("sweep %s: %d instance(s) x %d core(s) ...", spec["id"], ninstances, cores)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        record: dict[str, Any] = {
            "row": spec["id"],
            "ninstances": ninstances,
            "cores_per_instance": cores,
            "total_cores": ninstances * cores,
            "command": " ".join(cmd),
        }
        found = [json.loads(p.read_text()) for p in sorted(results.glob("worker-*.json"))]
        if proc.returncode != 0 or len(found) != ninstances:
            return {
                **record,
                "status": "failed",
                "error": _tail(proc.stderr + proc.stdout) or f"{len(found)} of {ninstances} instances reported",
            }
        key = str(b.sweep_batch_size)
        return {
            **record,
            "status": "ok",
            "total_samples_per_s": round(sum(r["batches"][key]["samples_per_s"] for r in found), 3),
            "instances": [
                {
                    "threads": r["threads"],
                    "samples_per_s": r["batches"][key]["samples_per_s"],
                    "median_ms": r["batches"][key]["median_ms"],
                    "peak_rss_mb": r["peak_rss_mb"],
                }
                for r in found
            ],
        }


def _public(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A row spec without this run's file paths."""
    return {k: v for k, v in spec.items() if k not in ("inputs", "work_dir")}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _progress_line(row: Mapping[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {str(row.get('error', ''))[-300:]}"
    parts = [f"b{b} {m['median_ms']:.1f} ms ({m['samples_per_s']:.2f}/s)" for b, m in row["batches"].items()]
    return ", ".join(parts) + f", peak RSS {row['peak_rss_mb']:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qala.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "recipe", nargs="?", help="YAML recipe with a benchmark section, e.g. benchmarks/squad_bench.yaml"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value to set, ~key.sub to reset to the default")
    parser.add_argument("--resume", action="store_true", help="keep rows already in bench.json for the same recipe")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one row spec
    parser.add_argument("--out", help=argparse.SUPPRESS)
    # Intermixed: `RECIPE --resume key=value` works as well as `--resume RECIPE key=value`.
    args = parser.parse_intermixed_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return worker(args.worker, args.out)
    if not args.recipe:
        parser.error("the recipe is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qala.data import SquadFormatError
    from qala.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        document = Bench(recipe, resume=args.resume).run()
    except (RecipeError, SquadFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(recipe.benchmark.output_dir)
    print(format_table(document), end="")
    print(f"wrote {out / BENCH_NAME}, {out / TABLE_NAME} and the plots")
    failed = [r["id"] for r in document["rows"] if r.get("status") == "failed"]
    if failed:
        print(f"rows that failed: {failed} (reasons in bench.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
