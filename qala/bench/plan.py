"""What a benchmark run measures: one planner of rows (engine x model x configuration x batch), published F1.

`padded` is a flag of the row: a padded row times model calls on windows padded to max_seq_length (the
paper's view) at every batch size; an unpadded row answers real questions end to end at one batch size.
Planning reads files and configs only (no timing, no weights), so a plan can be checked in tests and
--resume can tell which rows it already has. Every input (models, frontier, reports, the IPEX environment)
comes from the recipe: no row appears or vanishes because some file happens to be on disk.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qala.recipe import fingerprint

logger = logging.getLogger(__name__)

REFERENCE_ID = "BERT-base/fp32/full"
# The published shapes (BertConfig defaults are BERT-base). TinyBERT-6L is "6 layers, a hidden size of 768, a
# feed forward size of 3072 and 12 heads" (Intel/dynamic_tinybert model card, quoting Guskin et al. 2021);
# Dynamic-TinyBERT is that shape with token dropping.
BASELINE_SHAPES: dict[str, dict[str, Any]] = {
    "bert-base": {},
    "tinybert-6l": {"num_hidden_layers": 6},
    "dynamic-tinybert": {"num_hidden_layers": 6},
}
BASELINE_NAMES = {"bert-base": "BERT-base", "tinybert-6l": "TinyBERT-6L", "dynamic-tinybert": "Dynamic-TinyBERT"}
# Published SQuAD 1.1 dev F1 of the architecture-only rows; None where no figure could be checked.
PUBLISHED_F1: dict[str, dict[str, Any]] = {
    "bert-base": {"f1": 88.5, "source": "Devlin et al. 2019, BERT, Table 2: BERT-BASE (single) SQuAD 1.1 dev F1 88.5"},
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
# Guskin et al. 2021 (arXiv 2111.09645): "up to 3.3x with <1% loss-drop"; no per-layer configuration is
# published, so the row uses the constant keep ratio whose MACs come closest (dynamic_tinybert_length_config).
DYNAMIC_TINYBERT_SPEEDUP = 3.3
# Compiled INT8 builds one graph per shape; padding to a multiple of this bounds the graphs (all warmed first).
COMPILED_PAD_MULTIPLE = 32
# Serving engines (qala.quantize.engines.BACKENDS) by the rows they can run. Exported-graph engines without a
# suffix run an INT8 artifact's fp32 source, so fp32 rows only; "-int8" and "-inc" engines INT8 rows only
# (requantizes, serves_inc_int8); eager and compile-dynamic both. openvino-inc runs full length only.
FP32_ONLY_BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")
FULL_LENGTH_ONLY_BACKENDS = ("openvino-inc",)
TIMING = ("warmup", "repeats", "latency_repeats", "min_repeats", "max_seconds_per_measurement")
ONNX_MISSING = 'onnxruntime is not installed: pip install -e ".[onnx]"'
OPENVINO_MISSING = 'openvino/nncf are not installed: pip install -e ".[onnx]"'
IPEX_NOTE = {
    "status": "skipped",
    "reason": "IPEX is retired at 2.8 and runs in its own torch 2.8 environment: the recipe names none "
    "(benchmark.ipex_python and benchmark.ipex_calibration are null)",
    "build_command": "bash benchmarks/ipex_env.sh, then .venv-ipex/bin/python -m qala.bench.ipex",
}


def baseline_config(name: str, overrides: Mapping[str, Mapping[str, Any]]) -> Any:
    """transformers.BertConfig of a published baseline shape, with the recipe's overrides (tests shrink it)."""
    from transformers import BertConfig

    return BertConfig(**{**BASELINE_SHAPES[name], **overrides.get(name, {})})


def dynamic_tinybert_length_config(config: Any, reference: Any, seq_length: int) -> tuple[list[int], float]:
    """(length configuration, keep ratio): the constant ratio, in steps of 0.01, whose MACs are closest to
    BERT-base's divided by the published 3.3x."""
    from qala.lengths import constant_ratio_length_config
    from qala.model import macs_per_sample

    target = macs_per_sample(reference, None, seq_length) / DYNAMIC_TINYBERT_SPEEDUP
    layers = config.num_hidden_layers
    options = [(r / 100, constant_ratio_length_config(r / 100, layers, seq_length)) for r in range(30, 101)]
    ratio, lengths = min(options, key=lambda o: abs(macs_per_sample(config, o[1], seq_length) - target))
    return lengths, ratio


def point_setting(point: Mapping[str, Any]) -> tuple[str, list[float] | list[int]]:
    """("ratio", keep_ratios) or ("absolute", length_config) of one frontier point."""
    if point.get("keep_ratios") is not None:
        return "ratio", [float(r) for r in point["keep_ratios"]]
    return "absolute", [int(n) for n in point["length_config"]]


def is_full_length(point: Mapping[str, Any], seq_length: int | None) -> bool:
    """Whether a frontier point keeps every token (ratios all 1, or every layer at seq_length)."""
    mode, values = point_setting(point)
    return min(values) >= 1.0 if mode == "ratio" else seq_length is not None and min(values) >= seq_length


def pick_frontier(
    frontier: Sequence[Mapping[str, Any]], n: int, full_f1: float | None = None, seq_length: int | None = None
) -> list[Mapping[str, Any]]:
    """Up to n frontier points by cost: the cheapest within 1% relative F1 of the full model (when known), the
    most accurate, the cheapest, then evenly spaced. Full-length points are left out: the full rows measure them."""
    points = sorted((p for p in frontier if not is_full_length(p, seq_length)), key=lambda p: p["cost"])
    if n <= 0 or not points:
        return []
    near = [i for i, p in enumerate(points) if full_f1 is not None and p["f1"] >= 0.99 * full_f1]
    best = max(range(len(points)), key=lambda i: points[i]["f1"])
    candidates = near[:1] + [best, 0] + [round(k * (len(points) - 1) / max(n - 1, 1)) for k in range(n)]
    return [points[i] for i in sorted(list(dict.fromkeys(candidates))[:n])]


def frontier_full_f1(document: Mapping[str, Any] | None, seq_length: int | None) -> float | None:
    """The full-length F1 a search scored on its own questions (a frontier point, or its keep-ratio curve's
    keep 1.0), the reference for "within 1%" of its points; None when it has none."""
    candidates = [*(document or {}).get("frontier", []), *(document or {}).get("keep_ratio_curve", [])]
    return next((p["f1"] for p in candidates if p.get("f1") is not None and is_full_length(p, seq_length)), None)


def config_slug(length_config: Sequence[float] | None, mode: str = "absolute") -> str:
    """'full', 'lc-300-260-...' (absolute) or 'kr-0.9-0.8-...' (ratios): the configuration part of a row id."""
    if length_config is None:
        return "full"
    return ("kr-" if mode == "ratio" else "lc-") + "-".join(f"{v:g}" for v in length_config)


def row_id(name: str, dtype: str, length_config: Sequence[int] | None) -> str:
    return f"{name}/{dtype}/{config_slug(length_config)}"


spec_hash = fingerprint  # of a row spec (JSON-native): --resume keeps a measured row whose spec hashes the same


def bench_fingerprint(recipe: Any, table: str = "padded") -> str:
    """What every row's inputs depend on: the windows (padded) or the questions and how they are answered, and
    this host's thread default. Rows are matched on their own spec too, so sweep, peer or budget settings may
    change between a run and its --resume."""
    b = recipe.benchmark
    data = {"data": dataclasses.asdict(recipe.data), "threads": b.threads or os.cpu_count(), "gemm_size": b.gemm_size}
    data.update({"windows": b.windows} if table == "padded" else {"eval": dataclasses.asdict(recipe.eval)})
    return fingerprint(data)


def measured(f1: float | None, source: str | None) -> dict[str, Any]:
    """A row's F1 fields for a measured figure (None: no number, and no source)."""
    return {"f1": f1, "f1_published": False, "f1_source": source if f1 is not None else None}


def requantizes(backend: str | None) -> bool:
    """Whether a serving engine quantizes the fp32 model on its own ("-int8": ORT dynamic, NNCF; not INC's
    configuration): its INT8 rows start from benchmark.model, and no fp32 row is its."""
    return (backend or "").endswith("-int8")


def serves_inc_int8(backend: str | None) -> bool:
    """Whether a serving engine serves INC's INT8 artifact as tuned ("-inc": its scales and fp32 units, not
    re-quantized): its rows run benchmark.int8_model, and it refuses an fp32 model."""
    return (backend or "").endswith("-inc")


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf", "onnx"))


def openvino_bf16_native() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX): there bf16 is its default
    precision, so a user's plain OpenVINO run is bf16 and the table has that row too."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# --------------------------------------------------------------------------- the one planner


def plan_rows(
    recipe: Any, table: str = "padded", *, pad_multiple: int | None = None, qala_backends: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row spec of a table ("padded" or "questions"), in order, and notes on what it was planned from.

    Cells: the baselines (random weights), plain transformers and the peers (questions), qala at full length and
    at the chosen frontier points (each serving engine of `qala_backends`, else load_model with INT8 compiled per
    shape), ONNX Runtime at each configuration (padded), IPEX when the recipe names its environment.
    """
    from qala.utils import resolve_model_path

    bench, seq, padded = recipe.benchmark, recipe.data.max_seq_length, table == "padded"
    model_dir, int8_dir = (resolve_model_path(p) if p else None for p in (bench.model, bench.int8_model))
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    add = _adder(recipe, rows, padded, model_dir or int8_dir)
    _baselines(add, bench, seq, padded)
    if model_dir and not padded:
        _question_peers(add, bench, model_dir, notes)
    fp32_f1, int8_f1 = _full_f1(bench)
    ways = _qala_runs(bench, qala_backends, pad_multiple, (model_dir, int8_dir), padded)
    full_f1 = {"fp32": measured(fp32_f1, bench.fp32_eval), "int8": measured(int8_f1, bench.int8_report)}
    for dtype, way in ways:
        add("MiniLM", "qala", dtype, **way, **(full_f1[dtype] if padded else {}))
    chosen = _chosen_points(bench, seq, fp32_f1, notes, padded)
    # A full-length-only engine (openvino-inc) would refuse every keep-configuration row: full length only.
    full_only = {w["backend"] for _, w in ways if w.get("backend") in FULL_LENGTH_ONLY_BACKENDS}
    notes.update({"full_length_only": sorted(full_only)} if chosen and full_only else {})
    keep_ways = [(d, w) for d, w in ways if w.get("backend") not in full_only]
    for point in chosen:
        for dtype, way in [(d, w) for d in bench.frontier_dtypes for d2, w in keep_ways if d2 == d]:
            f1 = measured(point.get(f"f1_{dtype}"), point["source"]) if padded else {}
            add("QuaLA-MiniLM", "qala", dtype, *reversed(point_setting(point)), **way, **f1)
    configs = [None] + [list(p["length_config"]) for p in chosen] if padded else None
    if padded and bench.onnxruntime and model_dir and not onnxruntime_available():
        notes["onnxruntime"] = {"status": "skipped", "reason": ONNX_MISSING}
    elif padded and bench.onnxruntime and model_dir:
        for lengths, dtype in [(c, d) for c in configs for d in ("fp32", "int8")]:
            add("MiniLM-ONNXRuntime", "onnxruntime", dtype, lengths, path=model_dir, **measured(None, None))
    if bench.ipex_python and bench.ipex_calibration and model_dir:
        _ipex_rows(add, bench, seq, model_dir, configs, [w for d, w in keep_ways if d == "int8"], notes)
    else:
        notes["ipex"] = IPEX_NOTE
    for row in rows if padded else ():
        if row["id"] in bench.f1 and row.get("f1") is None:
            row.update(f1=float(bench.f1[row["id"]]), f1_published=False, f1_source="recipe benchmark.f1")
    return rows, notes


def _adder(recipe: Any, rows: list[dict[str, Any]], padded: bool, model: str | None) -> Callable[..., None]:
    """add(name, engine, dtype, length_config, mode, **fields): a padded row (every batch size, its kind and MACs
    at max_seq_length) or one real-questions row per batch size, with what every row of the table shares."""
    from transformers import AutoConfig, BertConfig

    from qala.answer import CALIBRATION_WINDOWS
    from qala.model import macs_per_sample
    from qala.utils import resolve_model_path

    b, d, e = recipe.benchmark, recipe.data, recipe.eval
    common: dict[str, Any] = {"padded": padded, "threads": b.threads or os.cpu_count() or 1}
    if padded:
        config = AutoConfig.from_pretrained(model) if model else None
        common.update(seq_length=d.max_seq_length, batch_sizes=list(b.batch_sizes))
        common.update({key: getattr(b, key) for key in TIMING})
    else:
        common.update(kind="real_questions", data=d.eval, data_split=d.eval_split, questions=d.max_eval_samples)
        common.update(max_seq_length=d.max_seq_length, doc_stride=d.doc_stride, n_best_size=e.n_best_size)
        common.update(max_answer_length=e.max_answer_length, warmup=b.warmup)
        common["tokenizer"] = model or resolve_model_path(recipe.model.tokenizer or recipe.model.name_or_path)
        # Engines that quantize with calibration (NNCF: OpenVINO INT8) read as many training windows as serving.
        common["calibration"] = {"data": d.train, "windows": CALIBRATION_WINDOWS}

    def add(name: str, engine: str, dtype: str, length_config=None, mode="absolute", **extra: Any) -> None:
        values = list(length_config) if length_config is not None else None
        head = {"name": name, "engine": engine, "dtype": dtype, "length_config": values}
        if padded:
            own = BertConfig(**extra["arch"]) if extra.get("arch") else config
            # What bench.json has always recorded as the row's kind (the worker runs the row's engine).
            kind = {"qala": "length_adaptive_random" if extra.get("arch") else f"{dtype}_dir"}.get(engine, engine)
            head = {"id": row_id(name, dtype, values), **head, "kind": kind}
            rows.append({**head, "macs_per_sample": macs_per_sample(own, values, d.max_seq_length), **common, **extra})
            return
        head["length_mode"] = mode if values is not None else None
        label = f"{engine}:{extra['backend']}" if extra.get("backend") else engine
        for batch_size in b.batch_sizes:
            key = f"{label}/{name}/{dtype}/{config_slug(values, mode)}/b{batch_size}"
            if key not in {r["id"] for r in rows}:  # planned already (a frontier point at an IPEX configuration)
                rows.append({"id": key, **head, "batch_size": batch_size, "python": None, **common, **extra})

    return add


def _baselines(add: Callable[..., None], bench: Any, seq: int, padded: bool) -> None:
    """Published shapes on random weights, speed only: all of them with their published F1 (padded), BERT-base
    through transformers (questions). Dynamic-TinyBERT runs qala's token dropping at a constant keep ratio."""
    reference = baseline_config("bert-base", bench.baseline_configs)
    for name in [n for n in bench.baselines if padded or n == "bert-base"]:
        arch = baseline_config(name, bench.baseline_configs)
        if not padded:
            note = "random weights: speed only, F1 not reported"
            add("BERT-base", "transformers", "fp32", arch=arch.to_diff_dict(), f1_note=note)
            continue
        published = PUBLISHED_F1[name]
        extra = {"arch": arch.to_diff_dict(), "f1": published["f1"], "f1_published": True}
        extra["f1_source"] = published["source"]
        if name != "dynamic-tinybert":
            add(BASELINE_NAMES[name], "transformers", "fp32", **extra)
            continue
        lengths, ratio = dynamic_tinybert_length_config(arch, reference, seq)
        extra["length_config_source"] = (
            f"no per-layer configuration is published; constant keep ratio {ratio} (each layer keeps {ratio} "
            f"of the previous layer's tokens), chosen as the ratio whose MACs are closest to BERT-base's / "
            f"{DYNAMIC_TINYBERT_SPEEDUP} (the paper's 'up to 3.3x with <1% loss-drop', arXiv 2111.09645)"
        )
        add(BASELINE_NAMES[name], "qala", "fp32", lengths, **extra)


def _question_peers(add: Callable[..., None], bench: Any, model_dir: str, notes: dict[str, Any]) -> None:
    """The model through transformers (sdpa), and peers on transformers' plain ONNX export (ONNX Runtime plain and
    fused, OpenVINO with dynamic shapes, INT8 by NNCF), fp32 and INT8, and OpenVINO bf16 where that is its
    CPU default; missing libraries are said in the notes."""
    add("MiniLM", "transformers", "fp32", path=model_dir, attn_implementation="sdpa")
    peers = [
        ("onnxruntime", ["onnxruntime", "onnxruntime-fused"], onnxruntime_available, ONNX_MISSING),
        ("openvino", ["openvino"], openvino_available, OPENVINO_MISSING),
    ]
    for key, engines, installed, missing in [p for p in peers if getattr(bench, p[0])]:
        if not installed():
            notes[key] = {"status": "skipped", "reason": missing}
            continue
        for engine, dtype in [(e, d) for e in engines for d in ("fp32", "int8")]:
            add("MiniLM", engine, dtype, path=model_dir)
        if key == "openvino" and openvino_bf16_native():
            add("MiniLM", "openvino", "bf16", path=model_dir)


def _full_f1(bench: Any) -> tuple[float | None, float | None]:
    """(fp32 F1, INT8 F1) at full length from train's eval.json and tune's report.json, via their readers."""
    from qala.train import read_eval
    from qala.tune import read_report

    report = read_report(bench.int8_report) if bench.int8_report else None
    int8 = report["full"]["int8"]["f1"] if report else None
    if bench.fp32_eval:
        return read_eval(bench.fp32_eval)["results"].get("full", {}).get("f1"), int8
    # A model trained elsewhere has no eval.json: tune's report scored its fp32 model too.
    return (report["full"]["fp32"]["f1"] if report else None), int8


def _qala_runs(
    bench: Any, backends: Sequence[str], pad_multiple: int | None, dirs: tuple[str | None, ...], padded: bool
) -> list[tuple[str, dict[str, Any]]]:
    """(dtype, fields with the directory run) of each way qala's rows run: each named serving backend (dynamic
    shapes: no buckets unless asked), or load_model (INT8 compiled per shape, bucketed on unpadded windows)."""
    named = [{"backend": name, "pad_to_multiple_of": pad_multiple} for name in backends]
    # An INT8-only engine (onnxruntime-int8, onnxruntime-inc) cannot run an fp32 row (it quantizes, or refuses
    # an fp32 model); an fp32-only engine runs an INT8 artifact's fp32 source, so no INT8 row.
    fp32 = [w for w in named if not (requantizes(w["backend"]) or serves_inc_int8(w["backend"]))] or [{}]
    int8 = [w for w in named if w["backend"] not in FP32_ONLY_BACKENDS]
    int8 = int8 or [{"compiled": bench.compile_int8}]
    if not named and not padded:
        int8[0]["pad_to_multiple_of"] = (pad_multiple or COMPILED_PAD_MULTIPLE) if bench.compile_int8 else None
    model_dir, int8_dir = dirs
    runs = [("fp32", {"path": model_dir, **way}) for way in fp32 if model_dir]
    # A self-quantizing engine (onnxruntime-int8, openvino-int8) starts from the fp32 model; others (onnxruntime-inc,
    # eager, compile-dynamic) run INC's artifact. The row's `quantization` comes from the engine when it runs.
    for way in int8:
        path = model_dir if requantizes(way.get("backend")) and model_dir else int8_dir
        runs += [("int8", {"path": path, **way})] if path else []
    return runs


def _chosen_points(bench: Any, seq: int, fp32_f1: float | None, notes: dict[str, Any], padded: bool) -> list[Any]:
    """The frontier points a table runs. Padded windows show absolute configurations only: without one in the
    frontier, the absolute configurations qala.tune scored (with both F1s) are run, said in the notes and the log."""
    from qala.search import read_frontier
    from qala.tune import read_report

    frontier = read_frontier(bench.frontier) if bench.frontier else None
    points, backend = list((frontier or {}).get("frontier", [])), (frontier or {}).get("backend")
    if padded:  # a search scores one dtype: the other has no F1
        source = f"{bench.frontier} (qala.search, {backend})"
        points = [{**p, f"f1_{backend}": p["f1"], "source": source} for p in points if "length_config" in p]
        if not points and bench.int8_report:
            report = bench.int8_report
            points = [
                {"length_config": lengths, "f1": row["int8"]["f1"], "f1_fp32": row["fp32"]["f1"]}
                | {"f1_int8": row["int8"]["f1"], "cost": sum(lengths), "source": f"{report} row {name}"}
                for name, row in read_report(report).items()
                if (lengths := row.get("length_config")) is not None
            ]
            notes["length_configs"] = {"source": report, "why": "the frontier has no absolute configuration"}
            logger.warning("padded table: no absolute configuration in the frontier; running those of %s", report)
    # Ratio points' F1s are on the search's questions: so is the full-length F1 they are held against.
    full_f1 = fp32_f1 if padded else (frontier_full_f1(frontier, seq) or fp32_f1)
    chosen = pick_frontier(points, bench.max_frontier_rows, full_f1, seq_length=seq)
    if frontier is not None:
        notes["frontier"] = {"file": bench.frontier, "backend": backend, "points": len(frontier.get("frontier", []))}
        notes["frontier"]["chosen"] = [list(p["length_config"]) if padded else point_setting(p) for p in chosen]
        notes["frontier"].update({"f1_applies_to": backend} if padded else {})
    return chosen


def _ipex_rows(
    add: Callable[..., None], bench: Any, seq: int, model_dir: str, configs: list | None, int8_runs: list, notes: dict
) -> None:
    """IPEX INT8 (torch 2.8, benchmark.ipex_python) at the configurations benchmark.ipex_calibration holds.
    Padded: full length and the table's configurations, F1 from benchmark.ipex_scores. Questions: full length
    unpadded (one trace serves every shape), and each calibrated configuration padded to max_seq_length (its
    trace bakes in top-k widths calibrated on padded windows), beside qala's INT8 rows on the same windows."""
    from pathlib import Path

    from qala.quantize.ipex import calibrated_length_configs

    calibrated = calibrated_length_configs(bench.ipex_calibration)
    ipex = {"path": model_dir, "python": str(Path(bench.ipex_python).absolute())}
    ipex["ipex_summaries"] = str(Path(bench.ipex_calibration).absolute())
    if configs is not None:
        scores = json.loads(Path(bench.ipex_scores).read_text())["rows"] if bench.ipex_scores else []
        for lengths in [c for c in configs if c in calibrated]:
            row = next((r for r in scores if r.get("length_config") == lengths and r.get("int8")), None)
            source = f"{bench.ipex_scores} ({row['config']}, whole dev, padded to 384)" if row else None
            add("MiniLM-IPEX", "ipex", "int8", lengths, **ipex, **measured(row and float(row["int8"]["f1"]), source))
        if missing := [c for c in configs if c not in calibrated]:
            notes["ipex"] = {"not_calibrated": missing, "calibrate_with": "python -m qala.bench.ipex --configs ..."}
        return
    add("MiniLM", "ipex", "int8", **ipex)
    for values in [c for c in calibrated if c is not None]:
        # A bucketed engine (openvino) serves these padded windows from its one max_seq_length bucket.
        padded = {"pad_to_multiple_of": seq, "buckets": [seq]}
        add("QuaLA-MiniLM", "ipex", "int8", values, **padded, **ipex)
        for way in int8_runs:
            add("QuaLA-MiniLM", "qala", "int8", values, **{**way, **padded})
