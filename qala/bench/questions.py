"""The real-questions table: what a user waits for, per question, end to end, on unpadded windows.

    python -m qala.bench benchmarks/real_questions.yaml --table questions [--resume]

Each row answers the first `data.max_eval_samples` questions of `data.eval` in requests of
`batch_size` questions: tokenization into overlapping windows (no padding), one forward call over all
windows of the request padded only to its longest window (dynamic padding), post-processing to answer
text. Every request is timed (qala.utils.time_calls), and the answers of that same timed pass give
the row's F1, so speed and accuracy always come from the same questions. Reported per row: ms per
question p50 / p90 (request time / questions in it), questions/s (questions / summed request time),
achieved GMAC/s on real tokens (qala.model.macs_per_sample at each window's real length, summed, over
the summed request time; padding positions are work done but not counted) and its share of the
measured INT8 GEMM peak (qala.bench.roofline, the machine's highest).

Rows: BERT-base fp32 (random weights, transformers, speed only), the model in `benchmark.model` through
transformers (sdpa), ONNX Runtime fp32 and dynamic INT8 (dynamic batch and sequence axes), qala fp32
and INT8 at full length, and qala at the frontier configurations of `benchmark.frontier` (points
with "keep_ratios" run in relative mode, points with "length_config" in absolute mode).

Engines: a row names an engine of ENGINES and may name its own Python (`python`): the worker then runs
under that interpreter (the IPEX environment, .venv-ipex), so an engine may live in another
environment with qala installed there (`pip install --no-deps -e .`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qala.bench import plan, report
from qala.bench.cli import Harness, environment

logger = logging.getLogger(__name__)

QUESTIONS_NAME = "real_questions.json"
QUESTIONS_TABLE = "real_questions.md"
QUESTIONS_PLOT = "real_questions.png"
# Compiled INT8 builds one graph per (windows, positions) shape; padding each request to a multiple of
# this many positions bounds the graphs to ~max_seq_length / 32 per window count (warmed before timing).
COMPILED_PAD_MULTIPLE = 32
# Training windows NNCF calibrates on (OpenVINO INT8 peer and qala's openvino-int8 engine).
CALIBRATION_WINDOWS = 300

# (start logits, end logits) as numpy arrays [windows, positions] for a batch of model inputs.
Predictor = Callable[[Mapping[str, Any]], tuple[Any, Any]]
# An engine builds (predictor, facts) from the row spec, its work folder and one request's inputs (engines
# that trace a graph per shape build the first one from it). facts["warm_every_shape"]: the engine builds
# something per input shape (torch.compile, IPEX's traced graphs), so every request shape is run once
# before timing and no timed request waits for a build.
Engine = Callable[[Mapping[str, Any], Path, Mapping[str, Any]], tuple[Predictor, dict[str, Any]]]


# --------------------------------------------------------------------------- planning (the harness side)


def plan_question_rows(
    recipe: Any, bench: Any, *, pad_multiple: int | None = None, qala_backends: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row spec of the real-questions table (one per configuration and batch size), and notes.

    `qala_backends`: serving engines of qala.quantize.engines.make_engine ("eager", "compile-dynamic",
    "onnxruntime-int8", ...) to run every qala row through, one row each. None given: load_model, INT8
    compiled per shape (CompiledQA) when benchmark.compile_int8, padded to `pad_multiple` buckets.
    """
    from qala.utils import resolve_model_path

    d, e = recipe.data, recipe.eval
    model_dir = resolve_model_path(bench.model) if bench.model else None
    int8_dir = resolve_model_path(bench.int8_model) if bench.int8_model else None
    tokenizer = model_dir or int8_dir or resolve_model_path(recipe.model.tokenizer or recipe.model.name_or_path)
    common = {
        "kind": "real_questions",
        "data": d.eval,
        "data_split": d.eval_split,
        "questions": d.max_eval_samples,
        "max_seq_length": d.max_seq_length,
        "doc_stride": d.doc_stride,
        "n_best_size": e.n_best_size,
        "max_answer_length": e.max_answer_length,
        "tokenizer": tokenizer,
        "threads": bench.threads or os.cpu_count() or 1,
        "warmup": bench.warmup,
        # Engines that quantize on their own with calibration (NNCF: OpenVINO INT8) read these training windows.
        "calibration": {"data": d.train, "windows": CALIBRATION_WINDOWS},
    }
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}

    def add(
        name: str,
        engine: str,
        dtype: str,
        *,
        length_config: Sequence[float] | None = None,
        length_mode: str | None = None,
        **extra: Any,
    ) -> None:
        values = list(length_config) if length_config is not None else None
        slug = plan.config_slug(values, length_mode or "absolute")
        label = f"{engine}:{extra['backend']}" if extra.get("backend") else engine
        for batch_size in bench.batch_sizes:
            rows.append(
                {
                    "id": f"{label}/{name}/{dtype}/{slug}/b{batch_size}",
                    "name": name,
                    "engine": engine,
                    "dtype": dtype,
                    "length_config": values,
                    "length_mode": length_mode if values is not None else None,
                    "batch_size": batch_size,
                    "python": None,
                    **common,
                    **extra,
                }
            )

    if "bert-base" in bench.baselines:
        arch = plan.baseline_config("bert-base", bench.baseline_configs).to_diff_dict()
        add("BERT-base", "transformers", "fp32", arch=arch, f1_note="random weights: speed only, F1 not reported")
    if model_dir:
        add("MiniLM", "transformers", "fp32", path=model_dir, attn_implementation="sdpa")
        # Peers on transformers' plain ONNX export: ONNX Runtime as is and through its transformer fusions,
        # OpenVINO with dynamic shapes (INT8: NNCF on the calibration windows), each fp32 and INT8.
        if bench.onnxruntime and plan.onnxruntime_available():
            for engine in ("onnxruntime", "onnxruntime-fused"):
                add("MiniLM", engine, "fp32", path=model_dir)
                add("MiniLM", engine, "int8", path=model_dir)
        elif bench.onnxruntime:
            notes["onnxruntime"] = {"status": "skipped", "reason": plan.ONNX_MISSING}
        if bench.openvino and plan.openvino_available():
            add("MiniLM", "openvino", "fp32", path=model_dir)
            add("MiniLM", "openvino", "int8", path=model_dir)
        elif bench.openvino:
            notes["openvino"] = {"status": "skipped", "reason": plan.OPENVINO_MISSING}
    # How qala rows run: each named serving backend (dynamic shapes: no buckets unless asked), or load_model.
    fp32_ways: list[dict[str, Any]] = [{"backend": name, "pad_to_multiple_of": pad_multiple} for name in qala_backends]
    # An exported-graph engine without -int8 (onnxruntime, openvino) runs an INT8 artifact's fp32 source: no INT8 row.
    int8_ways = [w for w in fp32_ways if w["backend"] not in ("onnxruntime", "openvino")] or [
        {
            "compiled": bench.compile_int8,
            "pad_to_multiple_of": (pad_multiple or COMPILED_PAD_MULTIPLE) if bench.compile_int8 else None,
        }
    ]
    # An engine that quantizes (onnxruntime-int8) cannot run an fp32 row: those rows skip it.
    fp32_ways = [way for way in fp32_ways if not str(way.get("backend", "")).endswith("-int8")] or [{}]
    for way in fp32_ways if model_dir else []:
        add("MiniLM", "qala", "fp32", path=model_dir, **way)
    # An engine that quantizes on its own starts from benchmark.model: its INT8 rows need no benchmark.int8_model.
    for way in int8_ways:
        if source := _int8_source(way, int8_dir, model_dir):
            add("MiniLM", "qala", "int8", path=source, **way)

    fp32_f1, _ = plan.measured_f1(bench)
    frontier, points = plan.read_frontier_points(bench)
    chosen = plan.pick_frontier(points, bench.max_frontier_rows, fp32_f1, seq_length=d.max_seq_length)
    if frontier is not None:
        notes["frontier"] = {
            "file": bench.frontier,
            "points": len(points),
            "chosen": [plan.point_setting(p) for p in chosen],
        }
    for point in chosen:
        mode, values = plan.point_setting(point)
        for dtype in bench.frontier_dtypes:
            for way in int8_ways if dtype == "int8" else fp32_ways:
                if source := _int8_source(way, int8_dir, model_dir) if dtype == "int8" else model_dir:
                    add("QuaLA-MiniLM", "qala", dtype, length_config=values, length_mode=mode, path=source, **way)

    if bench.ipex and plan.ipex_rows_available(model_dir):
        from qala.quantize.ipex import calibrated_length_configs

        python, summaries = str(plan.IPEX_PYTHON.absolute()), str(plan.IPEX_SUMMARIES.absolute())
        ipex = {"path": model_dir, "python": python, "ipex_summaries": summaries}
        add("MiniLM", "ipex", "int8", **ipex)  # full length: one trace serves every unpadded shape
        # A dropping configuration's IPEX trace bakes in its top-k widths, calibrated on windows padded to
        # max_seq_length: those rows pad every window to it (the paper's mode), and qala's INT8 rows at the same
        # absolute configurations run beside them on the same padded windows.
        for values in [c for c in calibrated_length_configs(plan.IPEX_SUMMARIES) if c is not None]:
            padded = {"length_config": values, "length_mode": "absolute", "pad_to_multiple_of": d.max_seq_length}
            # A bucketed engine (openvino) serves these padded windows from its one max_seq_length bucket.
            padded["buckets"] = [d.max_seq_length]
            add("QuaLA-MiniLM", "ipex", "int8", **padded, **ipex)
            for way in int8_ways:
                if not (source := _int8_source(way, int8_dir, model_dir)):
                    continue
                before, n = {r["id"] for r in rows}, len(rows)
                add("QuaLA-MiniLM", "qala", "int8", path=source, **{**way, **padded})
                # A frontier point of the same configuration already has these rows: keep those, no duplicate ids.
                rows[n:] = [r for r in rows[n:] if r["id"] not in before]
    elif bench.ipex:
        notes["ipex"] = plan.ipex_note()
    return rows, notes


def _int8_source(way: dict[str, Any], int8_dir: str | None, model_dir: str | None) -> str | None:
    """The directory an INT8 row runs (None: the row cannot be planned). An engine that quantizes by itself
    (onnxruntime-int8, openvino-int8) starts from the fp32 model; every other INT8 row runs qala's INT8 artifact."""
    if str(way.get("backend", "")).endswith("-int8") and model_dir:
        return model_dir
    return int8_dir


class QuestionsBench(Harness):
    """The real-questions run: GEMM peak, then one worker per row; real_questions.json/.md/.png."""

    document_name = QUESTIONS_NAME

    def __init__(
        self,
        recipe: Any,
        *,
        resume: bool = False,
        pad_multiple: int | None = None,
        qala_backends: Sequence[str] = (),
    ) -> None:
        super().__init__(recipe, resume=resume)
        self.pad_multiple, self.qala_backends = pad_multiple, list(qala_backends)
        env = environment()
        # "cpu" first: machines differ between sessions, and every figure is for this one.
        self.document = {"cpu": env["cpu"], **self.document, "versions": env["versions"], "environment": env}

    def make_fingerprint(self) -> str:
        """What every row's questions and answers depend on; rows also match on their own spec."""
        r = self.recipe
        data = {
            "data": dataclasses.asdict(r.data),
            "eval": dataclasses.asdict(r.eval),
            "threads": self.recipe.benchmark.threads or os.cpu_count(),
            "gemm_size": self.recipe.benchmark.gemm_size,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def save(self) -> None:
        from qala.utils import atomic_write_json, atomic_write_text

        report.add_questions_derived(self.document["rows"], self.document.get("gemm_peak"))
        atomic_write_json(self.out / QUESTIONS_NAME, self.document)
        atomic_write_text(self.out / QUESTIONS_TABLE, report.format_questions_table(self.document))

    def run(self) -> dict[str, Any]:
        from qala.bench.peers import RANDOM_WEIGHTS_SEED

        b = self.bench
        self.out.mkdir(parents=True, exist_ok=True)
        rows, notes = plan_question_rows(
            self.recipe, b, pad_multiple=self.pad_multiple, qala_backends=self.qala_backends
        )
        threads = b.threads or os.cpu_count() or 1
        questions = self.recipe.data.max_eval_samples
        self.document["method"] = {
            "questions": questions if questions is not None else "all",
            "data": self.recipe.data.eval,
            "batch_sizes": list(b.batch_sizes),
            "threads": threads,
            "warmup": b.warmup,
            "summary": (
                f"End to end per request of `batch` questions (tokenization, every window, post-processing), "
                f"windows unpadded and batched to the longest window of the request (qala rows: sorted by length, "
                f"one call per 32-token group); {threads} threads, one "
                f"worker process per row; ms/question = request time / its questions; questions/s = questions / "
                f"summed request time; F1 from the answers of the timed pass; GMAC/s on real tokens against "
                f"the measured INT8 GEMM peak. Warm-up: {b.warmup} untimed requests, plus every request shape "
                "once for compiled rows."
            ),
            "timer": "qala.utils.time_calls (one timed call per request) and qala.utils.latency_stats",
        }
        self.document["seeds"] = {
            "random_weights": RANDOM_WEIGHTS_SEED,
            "run": self.recipe.run.seed,
            "questions": "the first N questions of the file, in order (no sampling)",
        }
        self.document["notes"] = notes
        if b.gemm_peak:
            self.measure_gemm_peak(threads)
        self.measure_rows(rows, self.out / "work" / "questions", {})
        self.save()
        report.plot_questions(self.document, self.out / QUESTIONS_PLOT)
        return self.document

    def progress_line(self, row: Mapping[str, Any]) -> str:
        if row.get("status") != "ok":
            return super().progress_line(row)
        f1 = report.fmt(row.get("f1"), 2)
        return f"F1 {f1}, p50 {row['ms_p50']} ms/question, {row['questions_per_s']} questions/s"


# --------------------------------------------------------------------------- engines (the worker side)


def _length_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The model call's length argument: keep_ratios (relative), length_config (absolute), or none."""
    if spec.get("length_config") is None:
        return {}
    key = "keep_ratios" if spec.get("length_mode") == "ratio" else "length_config"
    return {key: list(spec["length_config"])}


def _logits(out: Any) -> tuple[Any, Any]:
    return out.start_logits.float().numpy(), out.end_logits.float().numpy()


def _qala_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    from qala.bench.peers import call_model
    from qala.quantize.load import load_model, model_kind

    length = _length_kwargs(spec)
    # An engine that quantizes by itself (onnxruntime-int8) reads the fp32 model for an int8 row.
    expected = "fp32" if str(spec.get("backend", "")).endswith("-int8") else spec["dtype"]
    if model_kind(spec["path"]) != expected:
        raise ValueError(f"{spec['path']} is an {model_kind(spec['path'])} model directory, the row is {spec['dtype']}")
    if spec.get("backend"):
        return _serving_engine(spec, work_dir, example, length)
    compiled = spec["dtype"] == "int8" and bool(spec.get("compiled"))
    model = load_model(spec["path"], compiled=compiled, expect=spec["dtype"])
    return (lambda inputs: _logits(call_model(model, inputs, **length))), {
        "compiled": compiled,
        "warm_every_shape": compiled,
    }


def _serving_engine(
    spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any], length: Mapping[str, Any]
) -> tuple[Predictor, dict]:
    """A qala row through a named engine of qala.quantize.engines (the one registry)."""
    from qala.bench.peers import call_model
    from qala.quantize.engines import make_engine

    backend = spec["backend"]
    options: dict[str, Any] = {}
    if backend.startswith(("onnxruntime", "openvino")):
        options.update(workdir=str(work_dir), threads=spec.get("threads"))
    if backend.startswith("openvino"):
        options["max_seq_length"] = spec["max_seq_length"]
        if spec.get("buckets"):
            options["buckets"] = spec["buckets"]
        if backend.endswith("-int8"):
            options["calibration"] = calibration_windows(spec)
    engine = make_engine(spec["path"], backend, **options)
    facts: dict[str, Any] = {"backend": backend, **getattr(engine, "facts", {})}
    if backend.startswith("openvino"):
        # Compile every (bucket, batch size) a request of up to `example`'s windows can split into, before timing.
        ratios = [length["keep_ratios"]] if "keep_ratios" in length else [None]
        configs = [length["length_config"]] if "length_config" in length else []
        warm = engine.warmup(
            batch_sizes=[example["input_ids"].size(0)], keep_ratios=[] if configs else ratios, length_configs=configs
        )
        facts.update(warmup=warm, compiled_models=len(engine._compiled))
    # Every request shape is still run once before timing (qala.bench's rule for any engine that may build
    # per shape); an engine with dynamic shapes makes that cheap.
    facts["warm_every_shape"] = backend != "eager"
    return (lambda inputs: _logits(call_model(engine, inputs, **length))), facts


def _transformers_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    from qala.bench.peers import call_model, random_model, transformers_model

    attn = spec.get("attn_implementation") or "sdpa"
    if spec.get("arch"):
        model = random_model(spec["arch"], length_adaptive=False, attn_implementation=attn)
        vocab = model.config.vocab_size

        def predict(inputs: Mapping[str, Any]) -> tuple[Any, Any]:
            # The tokenizer's ids may exceed a shrunk random vocabulary (tests); ids do not change the cost.
            inputs = {**inputs, "input_ids": inputs["input_ids"].clamp(max=vocab - 1)}
            return _logits(call_model(model, inputs))

        return predict, {"attn_implementation": model.config._attn_implementation}
    model = transformers_model(spec["path"], attn_implementation=attn)
    return (lambda inputs: _logits(call_model(model, inputs))), {"attn_implementation": attn}


def _onnxruntime_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    from qala.bench.peers import onnx_model

    if spec.get("length_config") is not None:
        raise ValueError(
            f"engine {spec['engine']!r} cannot run length_config {spec['length_config']}: full length only"
        )
    return onnx_model(spec, work_dir, fused=spec["engine"] == "onnxruntime-fused")


def _openvino_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    from qala.bench.peers import openvino_model

    if spec.get("length_config") is not None:
        raise ValueError(f"engine 'openvino' cannot run length_config {spec['length_config']}: full length only")
    calibration = calibration_windows(spec) if spec["dtype"] == "int8" else []
    return openvino_model(spec, work_dir, calibration)


def calibration_windows(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The first `calibration.windows` windows of the training file (unpadded, one per item) for engines that
    quantize on their own with calibration (NNCF): never the questions the row answers."""
    import torch
    from transformers import AutoTokenizer

    from qala.data import load_squad, prepare_eval_features
    from qala.model import MODEL_INPUTS
    from qala.utils import resolve_model_path

    wanted = spec.get("calibration") or {}
    if not wanted.get("data"):
        raise ValueError(f"row {spec['id']} quantizes with calibration but its spec names no calibration data")
    examples = load_squad(resolve_model_path(wanted["data"]), split="train")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    # Calibration only needs representative windows: training questions too long for this window size
    # (no context room beyond doc_stride; featurizing them is an error) are left out rather than failing the row.
    room = spec["max_seq_length"] - tokenizer.num_special_tokens_to_add(pair=True) - spec["doc_stride"]
    lengths = [len(ids) for ids in tokenizer(list(examples["question"]), add_special_tokens=False)["input_ids"]]
    examples = examples.select([i for i, n in enumerate(lengths) if n < room])
    windows: list[dict[str, Any]] = []
    for i in range(0, len(examples), 64):
        chunk = examples.select(range(i, min(i + 64, len(examples)))).with_format(None)[:]
        features = prepare_eval_features(
            chunk, tokenizer, max_seq_length=spec["max_seq_length"], doc_stride=spec["doc_stride"]
        )
        for j in range(len(features["input_ids"])):
            windows.append({k: torch.tensor([features[k][j]]) for k in MODEL_INPUTS if k in features})
        if len(windows) >= wanted["windows"]:
            break
    return windows[: wanted["windows"]]


def _ipex_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    # Runs under .venv-ipex/bin/python (torch 2.8, IPEX 2.8, qala installed with --no-deps): the INT8
    # model that benchmarks/ipex_quantize.py calibrated and scored, one traced graph per input shape.
    from qala.quantize.ipex import timing_callable

    if spec.get("length_mode") == "ratio":
        raise ValueError("IPEX rows take absolute length configurations (traced top-k sizes), not keep ratios")
    call, facts = timing_callable(spec["path"], spec.get("length_config"), example, summaries=spec["ipex_summaries"])

    def predict(inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        start, end = call(inputs)
        return start.float().numpy(), end.float().numpy()

    return predict, {**facts, "warm_every_shape": True}


# Engines by name (never by import path): what a row spec's "engine" may say.
ENGINES: dict[str, Engine] = {
    "qala": _qala_engine,
    "transformers": _transformers_engine,
    "onnxruntime": _onnxruntime_engine,
    "onnxruntime-fused": _onnxruntime_engine,
    "openvino": _openvino_engine,
    "ipex": _ipex_engine,
}


def length_groups(inputs: Mapping[str, Any], multiple: int | None = None) -> list[tuple[list[int], int]]:
    """(rows, width) per call of a qala row: the request's windows sorted by real length and grouped per 32
    tokens (qala.quantize.engines.length_batches), each group cut to its longest window (then padded to
    `multiple`, the row's pad_to_multiple_of). A request of 32 questions then pads each window by fewer than
    32 positions instead of every window to the request's longest."""
    from qala.quantize.engines import length_batches

    lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
    width = inputs["input_ids"].size(1)
    groups = []
    for rows in length_batches(lengths, max_batch=len(lengths)):
        longest = max(lengths[i] for i in rows)
        padded = longest + (-longest % multiple if multiple and multiple > 1 else 0)
        groups.append((rows, min(padded, width)))
    return groups


def grouped(predict: Predictor, multiple: int | None = None, pad_id: int = 0) -> Predictor:
    """`predict` called once per length group of the batch (length_groups); the logits come back at the
    batch's rows and positions (positions past a group's width: -1e4, padding, never an answer)."""
    import numpy as np
    import torch

    def run(inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        rows, width = inputs["input_ids"].shape
        start = np.full((rows, width), -1e4, dtype=np.float32)
        end = np.full((rows, width), -1e4, dtype=np.float32)
        for group, cut in length_groups(inputs, multiple):
            index = torch.tensor(group)
            part = {k: v[index, :cut] for k, v in inputs.items()}
            part = pad_to_multiple(part, multiple, pad_id)
            s, e = predict(part)
            start[group, :cut], end[group, :cut] = s[:, :cut], e[:, :cut]
        return start, end

    return run


def pad_to_multiple(inputs: dict[str, Any], multiple: int | None, pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a batch to a multiple of `multiple` positions (attention_mask 0 on the padding)."""
    import torch.nn.functional as F

    seq = inputs["input_ids"].size(1)
    extra = -seq % multiple if multiple and multiple > 1 else 0
    if not extra:
        return inputs
    return {k: F.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0) for k, v in inputs.items()}


def real_token_macs(config: Any, spec: Mapping[str, Any], lengths: Sequence[int]) -> int:
    """MACs of windows at their real lengths under the row's configuration (qala.model.macs_per_sample)."""
    from qala.model import kept_per_layer, macs_per_sample

    values, mode = spec.get("length_config"), spec.get("length_mode")
    total = 0
    for n in lengths:
        kept = None if values is None else kept_per_layer(values, n) if mode == "ratio" else list(values)
        total += macs_per_sample(config, kept, n)
    return total


def _backbone_config(spec: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig, BertConfig

    return BertConfig(**spec["arch"]) if spec.get("arch") else AutoConfig.from_pretrained(spec["path"])


def measure_questions(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One row: answer the questions request by request, each request timed; speed, F1 and MACs."""
    from transformers import AutoTokenizer

    from qala.data import (
        load_squad,
        postprocess_with_scores,
        prepare_eval_features,
        references_from,
        squad_metrics,
    )
    from qala.model import batch_inputs
    from qala.utils import environment_info, latency_stats, resolve_model_path, time_calls

    if spec["engine"] not in ENGINES:
        raise ValueError(f"unknown engine {spec['engine']!r}; expected one of {sorted(ENGINES)}")
    examples = load_squad(resolve_model_path(spec["data"]), split=spec["data_split"])
    n = min(spec["questions"] or len(examples), len(examples))
    columns = examples.select(range(n)).with_format(None).select_columns(["id", "question", "context", "answers"])[:]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    pad_id = tokenizer.pad_token_id or 0
    b = spec["batch_size"]
    requests = [{k: columns[k][i : i + b] for k in ("id", "question", "context")} for i in range(0, n, b)]

    def featurize(request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        features = prepare_eval_features(
            request, tokenizer, max_seq_length=spec["max_seq_length"], doc_stride=spec["doc_stride"]
        )
        inputs = pad_to_multiple(batch_inputs(features, pad_id=pad_id), spec.get("pad_to_multiple_of"), pad_id)
        return features, inputs

    def answer(request: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
        features, inputs = featurize(request)
        start, end = predict(inputs)
        return postprocess_with_scores(
            request,
            features,
            start,
            end,
            n_best_size=spec["n_best_size"],
            max_answer_length=spec["max_answer_length"],
        )

    # qala rows run a request's windows in length groups (length_groups): every call's shape is a group's.
    by_length = spec["engine"] == "qala"

    def call_shapes(inputs: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
        if not by_length:
            return (tuple(inputs["input_ids"].shape),)
        return tuple((len(rows), cut) for rows, cut in length_groups(inputs, spec.get("pad_to_multiple_of")))

    # An untimed pass over the tokenizer gives every request's call shapes (to warm compiled graphs before the
    # clock starts: no request may wait for a compile) and every window's real length (for the MACs).
    # Requests to warm with: each brings a call shape no earlier one had.
    shapes: set[tuple[int, int]] = set()
    warm: list[dict[str, Any]] = []
    real_lengths: list[int] = []
    padded_positions = 0
    for request in requests:
        features, inputs = featurize(request)
        calls = call_shapes(inputs)
        if not set(calls) <= shapes:
            warm.append(inputs)
            shapes.update(calls)
        real_lengths += [len(ids) for ids in features["input_ids"]]
        padded_positions += sum(rows * width for rows, width in calls)
    # The example is the request with the most windows: engines that compile per batch size warm up to it.
    example = max(warm, key=lambda inputs: inputs["input_ids"].size(0))
    predict, facts = ENGINES[spec["engine"]](spec, Path(spec["work_dir"]), example)
    if by_length:
        predict = grouped(predict, spec.get("pad_to_multiple_of"), pad_id)
        facts = {**facts, "length_groups": "windows sorted by length, one call per 32-token group"}
    for request in requests[: spec.get("warmup", 1)]:
        answer(request)
    if facts.get("warm_every_shape"):
        for inputs in warm:
            predict(inputs)

    predictions: dict[str, str] = {}
    queue = iter(requests)

    def next_request() -> None:
        predictions.update({qid: text for qid, (text, _) in answer(next(queue)).items()})

    seconds = time_calls(next_request, warmup=0, repeats=len(requests))
    per_question = [s / len(r["id"]) for s, r in zip(seconds, requests, strict=True)]
    stats = latency_stats(per_question)
    metrics = squad_metrics(predictions, references_from(columns))
    total = sum(seconds)
    macs = real_token_macs(_backbone_config(spec), spec, real_lengths)
    return {
        **facts,
        "questions": n,
        "requests": len(requests),
        "windows": len(real_lengths),
        "real_tokens": sum(real_lengths),
        "padded_positions": padded_positions,
        "shapes": len(shapes),
        "untimed_warmup_requests": min(spec.get("warmup", 1), len(requests)),
        "warmed_shapes": len(shapes) if facts.get("warm_every_shape") else 0,
        "f1": None if spec.get("f1_note") else round(metrics["f1"], 2),
        "exact_match": None if spec.get("f1_note") else round(metrics["exact_match"], 2),
        "ms_p50": stats["p50_ms"],
        "ms_p90": stats["p90_ms"],
        "ms_p99": stats["p99_ms"],
        "questions_per_s": round(n / total, 3),
        "seconds": round(total, 3),
        "gmacs_real_tokens": round(macs / 1e9, 3),
        "achieved_gmacs_per_s": round(macs / total / 1e9, 3),
        "python": sys.executable,
        "worker_versions": environment_info()["versions"],
    }
