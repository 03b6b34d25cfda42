"""What a benchmark run measures: the rows of the padded table, published accuracy, the frontier pick.

Planning reads files and configs only (no timing, no model weights), so a plan can be checked in tests
and a resumed run can tell which rows it already has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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

# Where the IPEX environment lives (README); rows that need it run under its python.
IPEX_PYTHON = Path(".venv-ipex/bin/python")
# The IPEX calibration (qconf summaries per length configuration) and the whole-dev F1 of those models,
# both written by benchmarks/ipex_quantize.py (run in .venv-ipex); IPEX rows time exactly those models.
IPEX_SUMMARIES = Path("runs/ipex_reference/ipex_calibration.json")
IPEX_SCORES = Path("benchmarks/results/ipex_squad_reference.json")


def baseline_config(name: str, overrides: Mapping[str, Mapping[str, Any]]) -> Any:
    """transformers.BertConfig of a published baseline shape, with the recipe's overrides (tests shrink it)."""
    from transformers import BertConfig

    return BertConfig(**{**BASELINE_SHAPES[name], **overrides.get(name, {})})


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


def point_setting(point: Mapping[str, Any]) -> tuple[str, list[float] | list[int]]:
    """("ratio", keep_ratios) or ("absolute", length_config) of one frontier point."""
    if point.get("keep_ratios") is not None:
        return "ratio", [float(r) for r in point["keep_ratios"]]
    return "absolute", [int(n) for n in point["length_config"]]


def is_full_length(point: Mapping[str, Any], seq_length: int | None) -> bool:
    """Whether a frontier point keeps every token (ratios all 1, or every layer at seq_length)."""
    mode, values = point_setting(point)
    if mode == "ratio":
        return min(values) >= 1.0
    return seq_length is not None and min(values) >= seq_length


def pick_frontier(
    frontier: Sequence[Mapping[str, Any]], n: int, full_f1: float | None = None, seq_length: int | None = None
) -> list[Mapping[str, Any]]:
    """Up to n frontier points: the cheapest within 1% relative F1 of the full model (when its F1 is known),
    the most accurate, the cheapest, then evenly spaced between, ordered by cost. The full-length point
    is left out: the full-length rows already measure it."""
    points = sorted((p for p in frontier if not is_full_length(p, seq_length)), key=lambda p: p["cost"])
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


def config_slug(length_config: Sequence[float] | None, mode: str = "absolute") -> str:
    """'full', 'lc-300-260-...' (absolute) or 'kr-0.9-0.8-...' (ratios): the configuration part of a row id."""
    if length_config is None:
        return "full"
    return ("kr-" if mode == "ratio" else "lc-") + "-".join(f"{v:g}" for v in length_config)


def row_id(name: str, dtype: str, length_config: Sequence[int] | None) -> str:
    return f"{name}/{dtype}/{config_slug(length_config)}"


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def measured_f1(bench: Any) -> tuple[float | None, float | None]:
    """(fp32 F1, INT8 F1) at full length from the stages' own files, through their writers' readers:
    train's eval.json and tune's report.json."""
    from qala.train import read_eval
    from qala.tune import read_report

    report = read_report(bench.int8_report) if bench.int8_report else None
    int8 = report["full"]["int8"]["f1"] if report else None
    if bench.fp32_eval:
        fp32 = read_eval(bench.fp32_eval)["results"].get("full", {}).get("f1")
    else:  # a model trained elsewhere has no eval.json: tune's report scored its fp32 model too
        fp32 = report["full"]["fp32"]["f1"] if report else None
    return fp32, int8


def read_frontier_points(bench: Any) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(frontier document, its points) of the recipe's benchmark.frontier, or (None, [])."""
    if not bench.frontier:
        return None, []
    from qala.search import read_frontier

    document = read_frontier(bench.frontier)
    return document, list(document.get("frontier", []))


def report_points(bench: Any) -> list[dict[str, Any]]:
    """The absolute length configurations qala.tune scored (its report rows "keep_0.9", ...), as frontier-like
    points with both measured F1s ("f1_fp32", "f1_int8"): the padded table's QuaLA rows when the frontier
    holds none (a search in ratio units)."""
    if not bench.int8_report:
        return []
    from qala.tune import read_report

    points = []
    for name, row in read_report(bench.int8_report).items():
        if row.get("length_config") is not None:
            f1_fp32, f1_int8 = row["fp32"]["f1"], row["int8"]["f1"]
            points.append(
                {
                    "length_config": row["length_config"],
                    "f1": f1_int8,
                    "f1_fp32": f1_fp32,
                    "f1_int8": f1_int8,
                    "cost": sum(row["length_config"]),
                    "source": f"{bench.int8_report} row {name}",
                }
            )
    return points


def ipex_rows_available(model_dir: str | None) -> bool:
    return bool(model_dir) and IPEX_PYTHON.exists() and IPEX_SUMMARIES.is_file()


def ipex_f1(length_config: Sequence[int] | None) -> tuple[float | None, str | None]:
    """Whole-dev F1 of the IPEX INT8 model at `length_config` (padded to 384) from IPEX_SCORES, if measured."""
    if not IPEX_SCORES.is_file():
        return None, None
    wanted = None if length_config is None else [int(n) for n in length_config]
    for row in json.loads(IPEX_SCORES.read_text())["rows"]:
        if row.get("length_config") == wanted and row.get("int8"):
            return float(row["int8"]["f1"]), f"{IPEX_SCORES} ({row['config']}, whole dev, padded to 384)"
    return None, None


def plan_rows(recipe: Any, bench: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row spec of the padded table, in order, and what the plan was built from (frontier, peers)."""
    from transformers import AutoConfig

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

    shapes = {name: baseline_config(name, bench.baseline_configs) for name in BASELINE_SHAPES}
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

    fp32_f1, int8_f1 = measured_f1(bench)
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

    frontier, points = read_frontier_points(bench)
    # The padded table runs absolute configurations (the paper's units); ratio points belong to the
    # real-questions table (qala.bench.questions).
    absolute = [p for p in points if point_setting(p)[0] == "absolute"]
    if not absolute and report_points(bench):
        # A ratio-unit frontier has nothing for this table: the absolute configurations qala.tune scored are.
        absolute = report_points(bench)
        notes["length_configs"] = {"source": bench.int8_report, "why": "the frontier has no absolute configuration"}
    chosen = pick_frontier(absolute, bench.max_frontier_rows, fp32_f1, seq_length=seq)
    if frontier is not None:
        notes["frontier"] = {
            "file": bench.frontier,
            "backend": frontier.get("backend"),
            "points": len(points),
            "chosen": [list(p["length_config"]) for p in chosen],
            "f1_applies_to": frontier.get("backend"),
        }
    for point in chosen:
        for dtype in bench.frontier_dtypes:
            directory = model_dir if dtype == "fp32" else int8_dir
            if not directory:
                continue
            if "source" in point:  # a qala.tune report row: both F1s measured on the whole dev file
                source, f1 = point["source"], point[f"f1_{dtype}"]
            else:
                source = f"{bench.frontier} (qala.search, {frontier.get('backend')})"
                f1 = point["f1"] if frontier.get("backend") == dtype else None
            extra = {"compile": bench.compile_int8} if dtype == "int8" else {}
            kind = "fp32_dir" if dtype == "fp32" else "int8_dir"
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
        if not onnxruntime_available():
            notes["onnxruntime"] = {"status": "skipped", "reason": ONNX_MISSING}
        else:
            for lengths in [None] + [list(p["length_config"]) for p in chosen]:
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
    if bench.ipex and ipex_rows_available(model_dir):
        # IPEX INT8 (torch 2.8, its own environment) at full length and at the chosen configurations it was
        # calibrated for: the same padded windows as the PT2E and ONNX Runtime rows.
        from qala.quantize.ipex import calibrated_length_configs

        calibrated = calibrated_length_configs(IPEX_SUMMARIES)
        wanted = [None] + [list(p["length_config"]) for p in chosen]
        for lengths in [c for c in wanted if c in calibrated]:
            f1, source = ipex_f1(lengths)
            add(
                "MiniLM-IPEX",
                "ipex",
                "int8",
                config,
                lengths,
                path=model_dir,
                python=str(IPEX_PYTHON.absolute()),
                ipex_summaries=str(IPEX_SUMMARIES.absolute()),
                **measured(f1, source),
            )
        missing = [c for c in wanted if c not in calibrated]
        if missing:
            notes["ipex"] = {"not_calibrated": missing, "calibrate_with": "benchmarks/ipex_quantize.py --configs ..."}
    elif bench.ipex:
        notes["ipex"] = ipex_note()
    for row in rows:
        if row["id"] in bench.f1 and row.get("f1") is None:
            row.update(f1=float(bench.f1[row["id"]]), f1_published=False, f1_source="recipe benchmark.f1")
    return rows, notes


ONNX_MISSING = 'onnxruntime is not installed: pip install -e ".[onnx]"'


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


OPENVINO_MISSING = 'openvino/nncf are not installed: pip install -e ".[onnx]"'


def openvino_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf", "onnx"))


def ipex_note() -> dict[str, Any]:
    """Why a table has no IPEX row: its traced graphs need torch 2.8 in their own environment, and the rows
    time the calibration benchmarks/ipex_quantize.py wrote."""
    return {
        "status": "skipped",
        "reason": "IPEX is retired at 2.8 and needs torch 2.8 in its own environment; "
        + (f"{IPEX_PYTHON} exists" if IPEX_PYTHON.exists() else f"{IPEX_PYTHON}: no such environment here")
        + "; "
        + (f"{IPEX_SUMMARIES} exists" if IPEX_SUMMARIES.is_file() else f"{IPEX_SUMMARIES}: not calibrated yet"),
        "build_command": "bash benchmarks/ipex_env.sh, then .venv-ipex/bin/python benchmarks/ipex_quantize.py",
    }
