"""Serving engines side by side on real SQuAD dev windows, unpadded, batch 1: ms per window, build time, logit error.

    python benchmarks/engines_bench.py --int8 runs/engine/int8_static [--rounds 5]

Engines run interleaved (round r times every engine at every (length, configuration) before round
r + 1), medians over rounds, so load from other processes on a shared CPU hits all of them alike:
compare ratios, not absolute times. Writes benchmarks/results/engines.json.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from qala.data import featurize, load_squad
from qala.quantize.engines import dynamo_graphs, make_engine
from qala.quantize.load import load_model
from qala.utils import atomic_write_json, environment_info, latency_stats, time_calls

RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
LENGTHS = (64, 160, 250, 384)


def dev_windows(model_dir: str, dev: str, lengths) -> dict[int, dict[str, torch.Tensor]]:
    """For each wanted length, the unpadded dev window whose length is closest (cut to exactly that length)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features = featurize(load_squad(dev).select(range(300)), tokenizer, train=False)
    rows = [features[i] for i in range(len(features))]
    chosen = {}
    for n in lengths:
        row = min(rows, key=lambda r: abs(len(r["input_ids"]) - n) if len(r["input_ids"]) >= n else 10**6)
        chosen[n] = {
            k: torch.tensor([row[k][:n]], dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")
        }
    return chosen


def max_diff(a, b) -> float:
    return round(
        max(float((a.start_logits - b.start_logits).abs().max()), float((a.end_logits - b.end_logits).abs().max())), 5
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/minilm-lat-squad-offline")
    parser.add_argument("--int8", default="runs/engine/int8_static")
    parser.add_argument("--dev", default="../shared/data/squad-v1.1/dev.json")
    parser.add_argument("--workdir", default="runs/engine/onnx_bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream", type=int, default=60, help="random-length requests after warm-up (recompile check)")
    parser.add_argument("--out", default="benchmarks/results/engines.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    windows = dev_windows(args.model, args.dev, LENGTHS)
    fp32, int8 = load_model(args.model), load_model(args.int8)
    engines, build = {}, {}
    plan = [
        ("torch-eager fp32", fp32, "eager", {}),
        ("compile-dynamic fp32", fp32, "compile-dynamic", {}),
        ("compile-dynamic int8 (INC PT2E static)", int8, "compile-dynamic", {}),
        ("onnxruntime fp32", fp32, "onnxruntime", {"workdir": f"{args.workdir}/fp32", "threads": args.threads}),
        (
            "onnxruntime int8 (dynamic, per-channel)",
            fp32,
            "onnxruntime-int8",
            {"workdir": f"{args.workdir}/int8", "threads": args.threads},
        ),
        ("openvino fp32 (static buckets)", fp32, "openvino", {"workdir": args.workdir, "threads": args.threads}),
        (
            "openvino int8 (NNCF on the timed windows: a quick look, not a calibration)",
            fp32,
            "openvino-int8",
            {"workdir": args.workdir, "threads": args.threads, "calibration": list(windows.values())},
        ),
    ]
    for name, model, backend, options in plan:
        start = time.perf_counter()
        engine = make_engine(model, backend, **options)
        made = time.perf_counter() - start
        graphs = dynamo_graphs()
        # OpenVINO compiles per (configuration, bucket): warm the configurations timed below.
        warm = engine.warmup(**({"keep_ratios": [None, RATIOS]} if backend.startswith("openvino") else {}))
        build[name] = {
            "backend": backend,
            "make_seconds": round(made, 2),
            "warmup_seconds": warm["warmup_seconds"],
            "new_dynamo_graphs": dynamo_graphs() - graphs,
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
        print(name, build[name], flush=True)
        engines[name] = engine

    configs = {"full": {}, "keep " + ",".join(map(str, RATIOS)): {"keep_ratios": RATIOS}}
    # Logit agreement with the eager PyTorch models.
    accuracy, references = {}, {}
    with torch.no_grad():  # once per window and configuration: the reference-op INT8 model is slow
        for n, inputs in windows.items():
            for cname, config in configs.items():
                references[n, cname] = (fp32(**inputs, **config), int8(**inputs, **config))
    for name, engine in engines.items():
        for n, inputs in windows.items():
            for cname, config in configs.items():
                out = engine(**inputs, **config)
                ref32, ref8 = references[n, cname]
                accuracy.setdefault(name, {})[f"{n}/{cname}"] = {
                    "vs_eager_fp32": max_diff(out, ref32),
                    "vs_eager_int8": max_diff(out, ref8),
                }

    seconds: dict[tuple[str, int, str], list[float]] = {}
    for r in range(args.rounds):
        for n, inputs in windows.items():
            for cname, config in configs.items():
                for name, engine in engines.items():
                    s = time_calls(lambda e=engine, c=config, i=inputs: e(**i, **c), warmup=1, repeats=3)
                    seconds.setdefault((name, n, cname), []).extend(s)
        print("round", r + 1, "done", flush=True)

    # A stream of random lengths and configurations after warm-up: does any request compile?
    rng = random.Random(0)
    stream_lengths = [rng.randint(20, 384) for _ in range(args.stream)]
    long_window = windows[384]
    stream = {}
    for name, engine in engines.items():
        if not hasattr(engine, "compiles_after_warmup"):
            continue
        graphs, start = dynamo_graphs(), time.perf_counter()
        for n in stream_lengths:
            ratios = (
                None if rng.random() < 0.3 else sorted((round(rng.uniform(0.3, 1.0), 2) for _ in RATIOS), reverse=True)
            )
            engine(**{k: v[:, :n] for k, v in long_window.items()}, keep_ratios=ratios)
        stream[name] = {
            "requests": len(stream_lengths),
            "requests_that_compiled": engine.compiles_after_warmup,
            "new_dynamo_graphs": dynamo_graphs() - graphs,
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(name, stream[name], flush=True)

    rows = []
    base = "torch-eager fp32"
    for (name, n, cname), s in seconds.items():
        stats = latency_stats(s)
        ref = latency_stats(seconds[(base, n, cname)])["median_ms"]
        rows.append(
            {
                "engine": name,
                "tokens": n,
                "config": cname,
                "batch_size": 1,
                "median_ms": stats["median_ms"],
                "p90_ms": stats["p90_ms"],
                "min_ms": stats["min_ms"],
                "samples": stats["repeats"],
                "speedup_vs_torch_eager_fp32": round(ref / stats["median_ms"], 2),
                **accuracy[name][f"{n}/{cname}"],
            }
        )
        print(f"{name:45s} {n:4d} {cname:28s} {stats['median_ms']:8.2f} ms  x{ref / stats['median_ms']:.2f}")
    flags = [
        f for f in ("avx512_vnni", "amx_int8", "amx_bf16", "avx512f", "avx2") if f in Path("/proc/cpuinfo").read_text()
    ]
    import onnxruntime

    env = environment_info()
    env["versions"]["onnxruntime"] = onnxruntime.__version__
    atomic_write_json(
        args.out,
        {
            "what": "serving engines for variable-length windows: unpadded real SQuAD dev windows, batch 1",
            "cpu": env["cpu"],
            "cpu_flags": flags,
            "threads": args.threads,
            "environment": env,
            "models": {
                "fp32": args.model,
                "int8": f"{args.int8} (INC 3.10 StaticQuantConfig minmax asym per-channel, "
                "64 train windows; quick quantization for speed only)",
            },
            "method": (
                f"{args.rounds} interleaved rounds: each round times every engine at every (length, configuration) "
                "with qala.utils.time_calls (1 warm-up + 3 timed calls) before the next round; medians over all "
                "timed calls. Windows: the dev.json window (first 300 questions) closest above each length, cut to it. "
                "max abs logit differences over all positions vs the eager PyTorch fp32 and INT8 models."
            ),
            "caveat": (
                "Shared 2-core KVM guest: other engineers' evaluations ran at the same time "
                f"(1-min load average {os.getloadavg()[0]:.1f} at the end); absolute ms are noisy and inflated: "
                "compare ratios within this run."
            ),
            "build": build,
            "stream_after_warmup": stream,
            "rows": rows,
        },
    )
    print("wrote", args.out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
