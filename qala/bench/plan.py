"""What a benchmark run measures: the rows of both tables, published accuracy, the frontier pick.

The padded table (plan_rows) times model calls on windows padded to max_seq_length, the paper's view;
the real-questions table (plan_question_rows) times whole questions end to end on unpadded windows.
Both are planned from the same sources: the recipe's models and the F1 their stages measured, the
frontier points picked, the peers installed here and the IPEX calibration. Planning reads files and
configs only (no timing, no model weights), so a plan can be checked in tests and a resumed run can
tell which rows it already has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
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

# Compiled INT8 builds one graph per (windows, positions) shape; padding each request to a multiple of
# this many positions bounds the graphs to ~max_seq_length / 32 per window count (warmed before timing).
COMPILED_PAD_MULTIPLE = 32
# Training windows NNCF calibrates on (OpenVINO INT8 peer and qala's openvino-int8 engine).
CALIBRATION_WINDOWS = 300

ONNX_MISSING = 'onnxruntime is not installed: pip install -e ".[onnx]"'
OPENVINO_MISSING = 'openvino/nncf are not installed: pip install -e ".[onnx]"'


# --------------------------------------------------------------------------- what both tables plan from


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


def bench_fingerprint(recipe: Any, table: str = "padded") -> str:
    """What every row's inputs depend on: the windows (padded table) or the questions and their answers
    (real questions), and this host's thread default. Rows are matched on their own spec as well, so sweep,
    peer or budget settings may change between a run and its --resume."""
    b = recipe.benchmark
    data = {"data": dataclasses.asdict(recipe.data), "threads": b.threads or os.cpu_count(), "gemm_size": b.gemm_size}
    if table == "padded":
        data["windows"] = b.windows
    else:
        data["eval"] = dataclasses.asdict(recipe.eval)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def model_dirs(bench: Any) -> tuple[str | None, str | None]:
    """(fp32 model directory, INT8 artifact directory) of the recipe, resolved; None where not given."""
    from qala.utils import resolve_model_path

    return tuple(resolve_model_path(path) if path else None for path in (bench.model, bench.int8_model))


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


def measured(f1: float | None, source: str | None) -> dict[str, Any]:
    """A row's F1 fields for a measured figure (None: no number, and no source)."""
    return {"f1": f1, "f1_published": False, "f1_source": source if f1 is not None else None}


def frontier_full_f1(document: Mapping[str, Any] | None, seq_length: int | None) -> float | None:
    """The full-length F1 a search scored on its own questions (a frontier point, or its keep-ratio curve's
    keep 1.0), the reference for "within 1%" of its points; None when it has none."""
    candidates = [*(document or {}).get("frontier", []), *(document or {}).get("keep_ratio_curve", [])]
    return next((p["f1"] for p in candidates if p.get("f1") is not None and is_full_length(p, seq_length)), None)


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
            f1 = {"f1": row["int8"]["f1"], "f1_fp32": row["fp32"]["f1"], "f1_int8": row["int8"]["f1"]}
            source = f"{bench.int8_report} row {name}"
            points.append(
                {"length_config": row["length_config"], **f1, "cost": sum(row["length_config"]), "source": source}
            )
    return points


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf", "onnx"))


def ipex_rows_available(model_dir: str | None) -> bool:
    return bool(model_dir) and IPEX_PYTHON.exists() and IPEX_SUMMARIES.is_file()


def ipex_row(model_dir: str) -> dict[str, Any]:
    """The fields of an IPEX row: the fp32 model, the environment's python and the calibration it loads."""
    return {"path": model_dir, "python": str(IPEX_PYTHON.absolute()), "ipex_summaries": str(IPEX_SUMMARIES.absolute())}


def ipex_f1(length_config: Sequence[int] | None) -> tuple[float | None, str | None]:
    """Whole-dev F1 of the IPEX INT8 model at `length_config` (padded to 384) from IPEX_SCORES, if measured."""
    if not IPEX_SCORES.is_file():
        return None, None
    wanted = None if length_config is None else [int(n) for n in length_config]
    for row in json.loads(IPEX_SCORES.read_text())["rows"]:
        if row.get("length_config") == wanted and row.get("int8"):
            return float(row["int8"]["f1"]), f"{IPEX_SCORES} ({row['config']}, whole dev, padded to 384)"
    return None, None


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


# --------------------------------------------------------------------------- the padded table


def plan_rows(recipe: Any, bench: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row spec of the padded table, in order, and what the plan was built from (frontier, peers).

    One row per (model, engine, dtype, length configuration), timed at every batch size: the baselines,
    MiniLM at full length, the chosen absolute configurations, ONNX Runtime and IPEX at each of those."""
    from transformers import AutoConfig

    from qala.model import macs_per_sample

    seq = recipe.data.max_seq_length
    timing = ("warmup", "repeats", "latency_repeats", "min_repeats", "max_seconds_per_measurement")
    threads = bench.threads or os.cpu_count() or 1
    common = {"seq_length": seq, "batch_sizes": list(bench.batch_sizes), "threads": threads}
    common.update({key: getattr(bench, key) for key in timing})
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}

    def add(name: str, kind: str, dtype: str, config: Any, length_config: Sequence[int] | None, **extra) -> None:
        lengths = list(length_config) if length_config is not None else None
        macs = macs_per_sample(config, lengths, seq)
        head = {"id": row_id(name, dtype, lengths), "name": name, "kind": kind, "dtype": dtype}
        rows.append({**head, "length_config": lengths, "macs_per_sample": macs, **common, **extra})

    for name, kind, config, lengths, extra in _baseline_rows(bench, seq):
        add(BASELINE_NAMES[name], kind, "fp32", config, lengths, **extra)
    model_dir, int8_dir = model_dirs(bench)
    config = AutoConfig.from_pretrained(model_dir or int8_dir) if (model_dir or int8_dir) else None
    fp32_f1, int8_f1 = measured_f1(bench)
    # INT8 as served: through CompiledQA (a graph per shape) unless benchmark.compile_int8 is off.
    runs = {"fp32": {"path": model_dir}, "int8": {"path": int8_dir, "compiled": bench.compile_int8}}
    runs = {dtype: fields for dtype, fields in runs.items() if fields["path"]}
    full_f1 = {"fp32": measured(fp32_f1, bench.fp32_eval), "int8": measured(int8_f1, bench.int8_report)}
    for dtype in runs:
        add("MiniLM", f"{dtype}_dir", dtype, config, None, **runs[dtype], **full_f1[dtype])
    chosen = _padded_points(bench, seq, fp32_f1, notes)
    for point in chosen:
        for dtype in [d for d in bench.frontier_dtypes if d in runs]:
            f1 = measured(point.get(f"f1_{dtype}"), point["source"])
            add("QuaLA-MiniLM", f"{dtype}_dir", dtype, config, point["length_config"], **runs[dtype], **f1)

    configs = [None] + [list(p["length_config"]) for p in chosen]
    if bench.onnxruntime and model_dir and not onnxruntime_available():
        notes["onnxruntime"] = {"status": "skipped", "reason": ONNX_MISSING}
    elif bench.onnxruntime and model_dir:
        for lengths in configs:
            for dtype in ("fp32", "int8"):
                add("MiniLM-ONNXRuntime", "onnxruntime", dtype, config, lengths, path=model_dir, **measured(None, None))
    if bench.ipex and ipex_rows_available(model_dir):
        # IPEX INT8 (torch 2.8, its own environment) at full length and at the chosen configurations it was
        # calibrated for: the same padded windows as the PT2E and ONNX Runtime rows.
        from qala.quantize.ipex import calibrated_length_configs

        calibrated = calibrated_length_configs(IPEX_SUMMARIES)
        for lengths in [c for c in configs if c in calibrated]:
            add("MiniLM-IPEX", "ipex", "int8", config, lengths, **ipex_row(model_dir), **measured(*ipex_f1(lengths)))
        if missing := [c for c in configs if c not in calibrated]:
            notes["ipex"] = {"not_calibrated": missing, "calibrate_with": "benchmarks/ipex_quantize.py --configs ..."}
    elif bench.ipex:
        notes["ipex"] = ipex_note()
    for row in rows:
        if row["id"] in bench.f1 and row.get("f1") is None:
            row.update(f1=float(bench.f1[row["id"]]), f1_published=False, f1_source="recipe benchmark.f1")
    return rows, notes


def _baseline_rows(bench: Any, seq: int) -> list[tuple[str, str, Any, list[int] | None, dict[str, Any]]]:
    """(name, kind, config, length configuration, fields) of each baseline: random weights, published F1."""
    shapes = {name: baseline_config(name, bench.baseline_configs) for name in BASELINE_SHAPES}
    rows = []
    for name in bench.baselines:
        published = PUBLISHED_F1[name]
        extra = {"arch": shapes[name].to_diff_dict(), "f1": published["f1"], "f1_published": True}
        extra["f1_source"] = published["source"]
        if name != "dynamic-tinybert":
            rows.append((name, "transformers", shapes[name], None, extra))
            continue
        lengths, ratio = dynamic_tinybert_length_config(shapes[name], shapes["bert-base"], seq)
        extra["length_config_source"] = (
            f"no per-layer configuration is published; constant keep ratio {ratio} (each layer keeps {ratio} "
            f"of the previous layer's tokens), chosen as the ratio whose MACs are closest to BERT-base's / "
            f"{DYNAMIC_TINYBERT_SPEEDUP} (the paper's 'up to 3.3x with <1% loss-drop', arXiv 2111.09645)"
        )
        rows.append((name, "length_adaptive_random", shapes[name], lengths, extra))
    return rows


def _padded_points(bench: Any, seq: int, fp32_f1: float | None, notes: dict[str, Any]) -> list[Mapping[str, Any]]:
    """The absolute configurations the padded table runs, each with its measured F1 per dtype ("f1_fp32",
    "f1_int8") and their "source". Ratio points belong to the real-questions table: a frontier without
    absolute points gives way to the absolute configurations qala.tune scored, which is said in the notes."""
    frontier, points = read_frontier_points(bench)
    backend = (frontier or {}).get("backend")
    source = f"{bench.frontier} (qala.search, {backend})"  # a search scores one dtype: the other has no F1
    absolute = [{**p, f"f1_{backend}": p["f1"], "source": source} for p in points if point_setting(p)[0] == "absolute"]
    if not absolute and (tuned := report_points(bench)):
        absolute = tuned
        notes["length_configs"] = {"source": bench.int8_report, "why": "the frontier has no absolute configuration"}
    chosen = pick_frontier(absolute, bench.max_frontier_rows, fp32_f1, seq_length=seq)
    if frontier is not None:
        notes["frontier"] = {
            "file": bench.frontier,
            "backend": backend,
            "points": len(points),
            "chosen": [list(p["length_config"]) for p in chosen],
            "f1_applies_to": backend,
        }
    return chosen


# --------------------------------------------------------------------------- the real-questions table


def plan_question_rows(
    recipe: Any, bench: Any, *, pad_multiple: int | None = None, qala_backends: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row spec of the real-questions table (one per configuration and batch size), and notes.

    `qala_backends`: serving engines of qala.quantize.engines.make_engine ("eager", "compile-dynamic",
    "onnxruntime-int8", ...) to run every qala row through, one row each. None given: load_model, INT8
    compiled per shape (CompiledQA) when benchmark.compile_int8, padded to `pad_multiple` buckets.
    """
    model_dir, int8_dir = model_dirs(bench)
    common = _question_fields(recipe, bench, model_dir or int8_dir)
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}

    def add(name: str, engine: str, dtype: str, *, length_config=None, length_mode=None, **extra: Any) -> None:
        values = list(length_config) if length_config is not None else None
        slug = config_slug(values, length_mode or "absolute")
        label = f"{engine}:{extra['backend']}" if extra.get("backend") else engine
        head = {"name": name, "engine": engine, "dtype": dtype, "length_config": values}
        head["length_mode"] = length_mode if values is not None else None
        for batch_size in bench.batch_sizes:
            key = f"{label}/{name}/{dtype}/{slug}/b{batch_size}"
            if key not in {r["id"] for r in rows}:  # planned already (a frontier point at an IPEX configuration)
                rows.append({"id": key, **head, "batch_size": batch_size, "python": None, **common, **extra})

    if "bert-base" in bench.baselines:
        arch = baseline_config("bert-base", bench.baseline_configs).to_diff_dict()
        add("BERT-base", "transformers", "fp32", arch=arch, f1_note="random weights: speed only, F1 not reported")
    if model_dir:
        _question_peers(add, bench, model_dir, notes)
    qala = _qala_runs(bench, qala_backends, pad_multiple, model_dir, int8_dir)
    for dtype, way in qala:
        add("MiniLM", "qala", dtype, **way)
    fp32_f1, _ = measured_f1(bench)
    frontier, points = read_frontier_points(bench)
    # The points' F1s are on the search's questions: so is the full-length F1 they are held against.
    seq = recipe.data.max_seq_length
    full_f1 = frontier_full_f1(frontier, seq) or fp32_f1
    chosen = pick_frontier(points, bench.max_frontier_rows, full_f1, seq_length=seq)
    if frontier is not None:
        notes["frontier"] = {
            "file": bench.frontier,
            "points": len(points),
            "chosen": [point_setting(p) for p in chosen],
        }
    for point in chosen:
        mode, values = point_setting(point)
        for dtype in bench.frontier_dtypes:
            for way in [w for d, w in qala if d == dtype]:
                add("QuaLA-MiniLM", "qala", dtype, length_config=values, length_mode=mode, **way)
    if bench.ipex and ipex_rows_available(model_dir):
        _ipex_question_rows(add, recipe.data.max_seq_length, model_dir, [w for d, w in qala if d == "int8"])
    elif bench.ipex:
        notes["ipex"] = ipex_note()
    return rows, notes


def _question_fields(recipe: Any, bench: Any, model: str | None) -> dict[str, Any]:
    """What every real-questions row shares: the questions, how they are windowed and answered, threads."""
    from qala.utils import resolve_model_path

    d, e = recipe.data, recipe.eval
    return {
        "kind": "real_questions",
        "data": d.eval,
        "data_split": d.eval_split,
        "questions": d.max_eval_samples,
        "max_seq_length": d.max_seq_length,
        "doc_stride": d.doc_stride,
        "n_best_size": e.n_best_size,
        "max_answer_length": e.max_answer_length,
        "tokenizer": model or resolve_model_path(recipe.model.tokenizer or recipe.model.name_or_path),
        "threads": bench.threads or os.cpu_count() or 1,
        "warmup": bench.warmup,
        # Engines that quantize on their own with calibration (NNCF: OpenVINO INT8) read these training windows.
        "calibration": {"data": d.train, "windows": CALIBRATION_WINDOWS},
    }


def _question_peers(add: Callable[..., None], bench: Any, model_dir: str, notes: dict[str, Any]) -> None:
    """The model through transformers (sdpa), and peers on transformers' plain ONNX export: ONNX Runtime as is
    and through its transformer fusions, OpenVINO with dynamic shapes (INT8: NNCF on the calibration windows),
    each fp32 and INT8. A peer whose libraries are missing is said in the notes."""
    add("MiniLM", "transformers", "fp32", path=model_dir, attn_implementation="sdpa")
    peers = [
        ("onnxruntime", ["onnxruntime", "onnxruntime-fused"], onnxruntime_available, ONNX_MISSING),
        ("openvino", ["openvino"], openvino_available, OPENVINO_MISSING),
    ]
    for key, engines, installed, missing in peers:
        if getattr(bench, key) and not installed():
            notes[key] = {"status": "skipped", "reason": missing}
        elif getattr(bench, key):
            for engine in engines:
                add("MiniLM", engine, "fp32", path=model_dir)
                add("MiniLM", engine, "int8", path=model_dir)


def _qala_runs(
    bench: Any, qala_backends: Sequence[str], pad_multiple: int | None, model_dir: str | None, int8_dir: str | None
) -> list[tuple[str, dict[str, Any]]]:
    """(dtype, row fields with the directory run) of each way qala's rows run: each named serving backend
    (dynamic shapes: no buckets unless asked), or load_model (INT8 compiled per shape, bucketed)."""
    named = [{"backend": name, "pad_to_multiple_of": pad_multiple} for name in qala_backends]
    bucket = (pad_multiple or COMPILED_PAD_MULTIPLE) if bench.compile_int8 else None
    # An engine that quantizes (onnxruntime-int8) cannot run an fp32 row: those rows skip it.
    fp32 = [w for w in named if not w["backend"].endswith("-int8")] or [{}]
    # An exported-graph engine without -int8 (onnxruntime, openvino) runs an INT8 artifact's fp32 source: no INT8 row.
    int8 = [w for w in named if w["backend"] not in ("onnxruntime", "openvino")]
    int8 = int8 or [{"compiled": bench.compile_int8, "pad_to_multiple_of": bucket}]
    runs = [("fp32", {"path": model_dir, **way}) for way in fp32 if model_dir]
    # An engine that quantizes by itself (onnxruntime-int8, openvino-int8) starts from the fp32 model, needing no
    # benchmark.int8_model; every other INT8 row runs qala's INT8 artifact.
    for way in int8:
        path = model_dir if way.get("backend", "").endswith("-int8") and model_dir else int8_dir
        runs += [("int8", {"path": path, **way})] if path else []
    return runs


def _ipex_question_rows(
    add: Callable[..., None], seq: int, model_dir: str, int8_runs: Sequence[dict[str, Any]]
) -> None:
    """IPEX at full length (one trace serves every unpadded shape) and at each calibrated configuration."""
    from qala.quantize.ipex import calibrated_length_configs

    add("MiniLM", "ipex", "int8", **ipex_row(model_dir))
    # A dropping configuration's IPEX trace bakes in its top-k widths, calibrated on windows padded to
    # max_seq_length: those rows pad every window to it (the paper's mode), and qala's INT8 rows at the same
    # absolute configurations run beside them on the same padded windows. A bucketed engine (openvino) serves
    # these padded windows from its one max_seq_length bucket.
    for values in [c for c in calibrated_length_configs(IPEX_SUMMARIES) if c is not None]:
        padded = {"length_config": values, "length_mode": "absolute", "pad_to_multiple_of": seq, "buckets": [seq]}
        add("QuaLA-MiniLM", "ipex", "int8", **padded, **ipex_row(model_dir))
        for way in int8_runs:
            add("QuaLA-MiniLM", "qala", "int8", **{**way, **padded})
