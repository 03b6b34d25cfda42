"""The searched frontier as a table: F1, batch-1 latency (from the search), batch-32 latency (measured here), MACs.

python benchmarks/frontier_table.py runs/squad_offline/search/frontier.json benchmarks/results/search_squad_offline.json

The search times batch 1 only (its objective); this measures batch 32 for every frontier configuration
and the constant-keep-ratio curve through the same backend (INT8: qala.quantize.CompiledQA), on real
dev windows padded to the frontier's max_seq_length, median of `--repeats` calls after one warm-up call
(which compiles the graph). Frontier points may be absolute (length_config) or relative (keep_ratios, the
search's ratio mode); for ratio frontiers the headline timing is the real-questions table
(python -m qala.bench benchmarks/real_questions.yaml --table questions), on unpadded windows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from qala.bench.peers import call_model
from qala.bench.plan import point_setting
from qala.data import load_split, windows
from qala.model import batch_inputs
from qala.quantize.load import load_model
from qala.recipe import DataConfig
from qala.search import read_frontier
from qala.utils import atomic_write_json, environment_info, latency_stats, time_calls


def setting(point: dict[str, Any]) -> tuple[str, tuple[float, ...]]:
    """A frontier point's configuration as a key: ("ratio", keep_ratios) or ("absolute", length_config)."""
    mode, values = point_setting(point)
    return mode, tuple(values)


def measure_batch32(document: dict[str, Any], repeats: int) -> dict[tuple[str, tuple[float, ...]], dict[str, float]]:
    from transformers import AutoTokenizer

    model_dir = document["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = DataConfig(
        eval=document["eval"]["data"], max_seq_length=document["max_seq_length"], doc_stride=document["doc_stride"]
    )
    features = windows(load_split(data, "eval"), tokenizer, data, train=False)
    inputs = batch_inputs(features[:32])
    # INT8 through CompiledQA, the deployed path; fp32 eager.
    model = load_model(model_dir, compiled=document["backend"] == "int8", expect=document["backend"])
    configs = {setting(r) for r in document["frontier"] + document["keep_ratio_curve"]}
    timings = {}
    for mode, values in sorted(configs, reverse=True):
        # Ratio genes keep shares of each window's real tokens; absolute ones count padded positions.
        length = {"keep_ratios" if mode == "ratio" else "length_config": list(values)}
        seconds = time_calls(lambda kw=length: call_model(model, inputs, **kw), warmup=1, repeats=repeats)
        timings[mode, values] = latency_stats(seconds)
        print(mode, values, timings[mode, values]["median_ms"], flush=True)
    return timings


def markdown(document: dict[str, Any]) -> str:
    full = next(r for r in document["keep_ratio_curve"] if r["keep_ratio"] == 1.0)
    lines = [
        "| length configuration | F1 (dev) | rel. F1 vs full | batch-1 ms | x full | batch-32 ms | GMACs/sample |",
        "|---|---|---|---|---|---|---|",
    ]

    def line(r: dict[str, Any], prefix: str = "") -> str:
        loss = (full["f1"] - r["f1"]) / full["f1"]
        return (
            f"| {prefix}`{list(setting(r)[1])}` | {r['f1']:.2f} | {-100 * loss:+.1f}% | {r['latency_ms']:.1f} | "
            f"{r['latency_ms'] / full['latency_ms']:.2f} | {r['batch32_ms']:.0f} | {r['macs'] / 1e9:.2f} |"
        )

    lines += [line(r) for r in document["frontier"]]
    lines += [line(r, f"keep {r['keep_ratio']:g} ") for r in document["keep_ratio_curve"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frontier", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    document = read_frontier(args.frontier)
    timings = measure_batch32(document, args.repeats)
    for row in document["frontier"] + document["keep_ratio_curve"]:
        row["batch32_ms"] = timings[setting(row)]["median_ms"]
    document["batch32"] = {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "statistic": "median after one warm-up (compiling) call",
        "environment": environment_info(),
    }
    atomic_write_json(args.out, document)
    print(markdown(document))


if __name__ == "__main__":
    main()
