"""How a benchmark row runs, in either table: qala's own engines and the peers it is compared with, by name.

A row's engine (ENGINES) builds (predict, facts) from the row spec, its work folder and an example batch
(engines that trace per shape build the first graph from it); predict(inputs) returns (start, end) logits
as numpy arrays [windows, positions]. facts["warm_every_shape"]: the engine builds something per input
shape, so every request shape is run once before timing. Peers: published architectures on random
weights, plain transformers, ONNX Runtime (plain or fused, fp32 or dynamic INT8) and OpenVINO (fp32 or
NNCF INT8) on transformers' plain ONNX export (qala.quantize.onnx, the exporter of qala's engines too),
and IPEX 2.8. Every peer library is imported locally: a worker in IPEX's environment imports only its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qala.model import MODEL_INPUTS
from qala.utils import directory_bytes

# Random-weight rows are seeded: speed does not depend on the weights, but a run should be repeatable.
RANDOM_WEIGHTS_SEED = 0

# (start logits, end logits) as numpy arrays [windows, positions] for a batch of model inputs.
Predictor = Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]]
Engine = Callable[[Mapping[str, Any], Path, Mapping[str, Any]], tuple[Predictor, dict[str, Any]]]


def call_model(model: Callable[..., Any], inputs: Mapping[str, Any], **length: Any) -> Any:
    """One inference call of a torch model (eager module or CompiledQA) without autograd.

    `length` is what the call keeps: length_config=[...] (absolute), keep_ratios=[...] (relative), or
    nothing (full length); None values are dropped so plain transformers models get no extra argument.
    """
    import torch

    kwargs = {k: v for k, v in length.items() if v is not None}
    with torch.no_grad():
        return model(**inputs, **kwargs)


def _logits(out: Any) -> tuple[np.ndarray, np.ndarray]:
    return out.start_logits.float().numpy(), out.end_logits.float().numpy()


def _length_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The model call's length argument: keep_ratios (relative), length_config (absolute), or none."""
    if spec.get("length_config") is None:
        return {}
    key = "keep_ratios" if spec.get("length_mode") == "ratio" else "length_config"
    return {key: list(spec["length_config"])}


def random_model(arch: Mapping[str, Any], *, length_adaptive: bool, attn_implementation: str | None = None) -> Any:
    """A randomly initialised BERT QA model of the given shape (BERT-base, TinyBERT-6L, Dynamic-TinyBERT).

    `length_adaptive` wraps it in qala's token-dropping model (Dynamic-TinyBERT's mechanism);
    otherwise it is transformers' own BertForQuestionAnswering.
    """
    import torch
    from transformers import AutoModelForQuestionAnswering, BertConfig

    from qala.model import LengthAdaptiveForQuestionAnswering

    config = BertConfig(**arch)
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    if length_adaptive:
        return LengthAdaptiveForQuestionAnswering.from_config(config).eval()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForQuestionAnswering.from_config(config, **kwargs).eval()


def _random_predictor(model: Any, **length: Any) -> tuple[Predictor, dict[str, Any]]:
    vocab = model.config.vocab_size

    def predict(inputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        # The tokenizer's ids may exceed a shrunk random vocabulary (tests); ids do not change the cost.
        inputs = {**inputs, "input_ids": inputs["input_ids"].clamp(max=vocab - 1)}
        return _logits(call_model(model, inputs, **length))

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return predict, {"size_bytes": size, "size_kind": "parameter_bytes"}


def transformers_model(path: str | Path, attn_implementation: str = "sdpa") -> Any:
    """The checkpoint as a user loads it with transformers alone (a qala directory is also one)."""
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering.from_pretrained(str(path), attn_implementation=attn_implementation).eval()


def _plain_export(spec: Mapping[str, Any], work_dir: Path) -> tuple[Path, Any, dict[str, Any]]:
    """transformers' QA model of the row's directory exported as a user would (qala.quantize.onnx's plain
    graph: dynamic batch and sequence axes, no qala code in it); (file, config, facts)."""
    from qala.quantize.onnx import export_onnx

    model = transformers_model(spec["path"], attn_implementation="eager")
    path = work_dir / "model.onnx"
    start = time.perf_counter()
    export_onnx(model, path, graph="plain")
    return path, model.config, {"export_seconds": round(time.perf_counter() - start, 2)}


def onnx_model(spec: Mapping[str, Any], work_dir: Path, *, fused: bool = False) -> tuple[Predictor, dict[str, Any]]:
    """(predict, facts) of the ONNX Runtime peer: the plain export (with `fused`, through ORT's transformer
    optimizer), fp32 or dynamic INT8 of that graph. A row with a length_config (the padded table) runs qala's
    adaptive graph at that configuration instead."""
    import onnxruntime as ort

    from qala.quantize import onnx as qonnx

    if spec.get("length_config") is not None:
        return _onnx_adaptive(spec, work_dir)
    # The settings of qala's ORT rows too (qala.quantize.onnx): ORT_ENABLE_ALL (InferenceSession's default) on
    # the row's threads; INT8 = quantize_dynamic with QInt8 weights per channel (its own default: per tensor).
    path, config, facts = _plain_export(spec, work_dir)
    if fused:
        fused_path = work_dir / "model.fused.onnx"
        facts["fused_operators"] = qonnx.optimize_onnx(path, fused_path, config)
        path = fused_path
    if spec["dtype"] == "int8":
        int8_path = path.with_suffix(".int8.onnx")
        qonnx.quantize_onnx(path, int8_path)
        facts["quantization"] = qonnx.ORT_INT8_METHOD
        path = int8_path
    session = qonnx.ort_session(path, spec.get("threads"))
    names = [i.name for i in session.get_inputs()]
    facts.update(size_bytes=path.stat().st_size, size_kind="onnx file", onnxruntime=ort.__version__)

    def predict(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        start, end = session.run(None, qonnx.numpy_feeds(batch, names))
        return start, end

    return predict, facts


def _onnx_adaptive(spec: Mapping[str, Any], work_dir: Path) -> tuple[Predictor, dict[str, Any]]:
    from qala.model import LengthAdaptiveForQuestionAnswering
    from qala.quantize.onnx import OnnxEngine

    model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(spec["path"])).eval()
    engine = OnnxEngine(model, int8=spec["dtype"] == "int8", workdir=work_dir, threads=spec.get("threads"))
    lengths = list(spec["length_config"])
    engine.session("adaptive")
    path = Path(engine.facts["adaptive_graph"])
    facts = {"size_bytes": path.stat().st_size, "size_kind": "onnx file", "graph": "qala adaptive"}
    if spec["dtype"] == "int8":
        facts["quantization"] = engine.facts["quantization"]

    def predict(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        out = engine(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, length_config=lengths)
        return out.start_logits.numpy(), out.end_logits.numpy()

    return predict, facts


def openvino_model(
    spec: Mapping[str, Any], work_dir: Path, calibration: Sequence[Mapping[str, Any]] = ()
) -> tuple[Predictor, dict[str, Any]]:
    """The OpenVINO peer: the plain export read by OpenVINO with dynamic shapes, fp32, bf16, or INT8 by NNCF
    post-training quantization on `calibration` windows (qala.quantize.openvino's functions)."""
    import openvino as ov

    from qala.quantize import openvino as qov

    path, _, facts = _plain_export(spec, work_dir)
    model = qov.read_model(path)
    if spec["dtype"] == "int8":
        feeds = [{k: np.asarray(w[k], dtype=np.int64).reshape(1, -1) for k in MODEL_INPUTS} for w in calibration]
        start = time.perf_counter()
        model = qov.nncf_quantize(model, feeds)
        facts.update(
            quantization=f"{qov.NNCF_METHOD}, {len(feeds)} windows", nncf_seconds=round(time.perf_counter() - start, 1)
        )
    # f32 where not INT8 whatever the CPU; a "bf16" row asks for bf16 (OpenVINO's own default on bf16 CPUs).
    precision = "bf16" if spec["dtype"] == "bf16" else "f32"
    compiled = qov.compile_model(model, threads=spec.get("threads"), precision=precision)
    request = compiled.create_infer_request()
    facts.update(
        size_bytes=path.stat().st_size,
        size_kind="onnx file (fp32)",
        openvino=ov.__version__,
        inference_precision=precision,
    )
    if spec["dtype"] == "int8":
        facts["int8_layers"] = {k: v for k, v in qov.int8_precisions(compiled).items() if k.endswith(("u8", "i8"))}

    def predict(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        request.infer({k: np.asarray(batch[k], dtype=np.int64) for k in MODEL_INPUTS})
        return request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy()

    return predict, facts


def calibration_windows(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The first `calibration.windows` windows of the training file (unpadded, one per item) for engines that
    quantize on their own with calibration (NNCF): never the questions the row answers. Training questions
    too long for this window size are left out (qala.data.calibration_windows, which serving uses too)."""
    from transformers import AutoTokenizer

    from qala.data import calibration_windows as training_windows

    wanted = spec.get("calibration") or {}
    if not wanted.get("data"):
        raise ValueError(f"row {spec['id']} quantizes with calibration but its spec names no calibration data")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    return training_windows(
        wanted["data"],
        tokenizer,
        count=wanted["windows"],
        max_seq_length=spec["max_seq_length"],
        doc_stride=spec["doc_stride"],
    )


# --------------------------------------------------------------------------- the engines, by name


def _qala_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    """qala's model: a directory through load_model (INT8 compiled per shape when the row says so) or a named
    serving engine; with `arch`, qala's token dropping on random weights (Dynamic-TinyBERT, speed only)."""
    from qala.quantize.load import load_model, model_kind

    length = _length_kwargs(spec)
    if spec.get("arch"):
        predict, facts = _random_predictor(random_model(spec["arch"], length_adaptive=True), **length)
        return predict, {"attn_implementation": "eager (token selection reads attention probabilities)", **facts}
    # An engine that quantizes by itself (onnxruntime-int8) reads the fp32 model for an int8 row.
    expected = "fp32" if str(spec.get("backend", "")).endswith("-int8") else spec["dtype"]
    if model_kind(spec["path"]) != expected:
        raise ValueError(f"{spec['path']} is an {model_kind(spec['path'])} model directory, the row is {spec['dtype']}")
    if spec.get("backend"):
        return _serving_engine(spec, work_dir, example, length)
    compiled = spec["dtype"] == "int8" and bool(spec.get("compiled"))
    model = load_model(spec["path"], compiled=compiled, expect=spec["dtype"])
    facts = {"compiled": compiled, "warm_every_shape": compiled}
    facts.update(size_bytes=directory_bytes(spec["path"]), size_kind="directory")
    return (lambda inputs: _logits(call_model(model, inputs, **length))), facts


def _serving_engine(
    spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any], length: Mapping[str, Any]
) -> tuple[Predictor, dict]:
    """A qala row through a named engine of qala.quantize.engines (the one registry)."""
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
    attn = spec.get("attn_implementation") or "sdpa"
    if spec.get("arch"):
        model = random_model(spec["arch"], length_adaptive=False, attn_implementation=attn)
        predict, facts = _random_predictor(model)
        return predict, {"attn_implementation": model.config._attn_implementation, **facts}
    model = transformers_model(spec["path"], attn_implementation=attn)
    return (lambda inputs: _logits(call_model(model, inputs))), {"attn_implementation": attn}


def _onnxruntime_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    if spec.get("length_mode") == "ratio":
        raise ValueError(
            f"ONNX Runtime rows take full length or an absolute length_config, not keep ratios ({spec['id']})"
        )
    return onnx_model(spec, work_dir, fused=spec.get("engine") == "onnxruntime-fused")


def _openvino_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    if spec.get("length_config") is not None:
        raise ValueError(f"engine 'openvino' cannot run length_config {spec['length_config']}: full length only")
    calibration = calibration_windows(spec) if spec["dtype"] == "int8" else []
    return openvino_model(spec, work_dir, calibration)


def _ipex_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    # Runs under .venv-ipex/bin/python (torch 2.8, IPEX 2.8, qala installed with --no-deps): the INT8 model
    # that benchmarks/ipex_quantize.py calibrated and scored, one frozen trace per (configuration, shape); a
    # shape's first call builds its trace (never timed).
    from qala.quantize.ipex import timing_callable

    if spec.get("length_mode") == "ratio":
        raise ValueError("IPEX rows take absolute length configurations (traced top-k sizes), not keep ratios")
    call, facts = timing_callable(spec["path"], spec.get("length_config"), example, summaries=spec["ipex_summaries"])

    def predict(inputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        start, end = call(inputs)
        return start.float().numpy(), end.float().numpy()

    size = {"size_bytes": directory_bytes(spec["path"]), "size_kind": "directory (fp32 model + calibration)"}
    return predict, {**facts, "warm_every_shape": True, **size}


# Engines by name (never by import path): what a row spec's "engine" may say.
ENGINES: dict[str, Engine] = {
    "qala": _qala_engine,
    "transformers": _transformers_engine,
    "onnxruntime": _onnxruntime_engine,
    "onnxruntime-fused": _onnxruntime_engine,
    "openvino": _openvino_engine,
    "ipex": _ipex_engine,
}
