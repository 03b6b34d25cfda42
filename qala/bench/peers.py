"""How a benchmark row runs, in either table: qala's own engines and the peers it is compared with, by name.

ENGINES[name](spec, work folder, example batch) -> (predict, facts); predict(inputs) returns (start, end)
logits as numpy arrays [windows, positions]; engines that trace per shape build the first graph from the
example. facts["warm_every_shape"]: the engine builds something per input shape, so every request shape is
run once before timing. Peers: published architectures on random weights, plain transformers, ONNX Runtime
(plain or fused, fp32 or dynamic INT8) and OpenVINO (fp32, bf16 or NNCF INT8) on transformers' plain ONNX
export (qala.quantize.onnx, the exporter of qala's engines too), and IPEX 2.8. Peer libraries are imported
locally: a worker in IPEX's environment imports only its own.
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


def _torch_predictor(model: Callable[..., Any], **length: Any) -> Predictor:
    """predict(inputs) of a torch model (eager module, CompiledQA or a serving engine) without autograd, at
    `length`: length_config=[...] (absolute), keep_ratios=[...] (relative), or nothing (full length)."""
    import torch

    def predict(inputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = model(**inputs, **length)
        return out.start_logits.float().numpy(), out.end_logits.float().numpy()

    return predict


def length_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The model call's length argument of a row: keep_ratios (relative), length_config (absolute), or none. The
    one place the bench reads a row's `length_mode`: engines, MACs and refusals all ask here."""
    if spec.get("length_config") is None:
        return {}
    return {"keep_ratios" if spec.get("length_mode") == "ratio" else "length_config": list(spec["length_config"])}


def _random_model(arch: Mapping[str, Any], length: Mapping[str, Any], attn: str | None) -> tuple[Predictor, dict]:
    """A seeded random BERT QA model of a published shape: qala's token-dropping model when attn is None
    (Dynamic-TinyBERT's mechanism), else transformers' own BertForQuestionAnswering with that attention."""
    import torch
    from transformers import AutoModelForQuestionAnswering, BertConfig

    from qala.model import LengthAdaptiveForQuestionAnswering

    config = BertConfig(**arch)
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    if attn is None:
        model = LengthAdaptiveForQuestionAnswering.from_config(config).eval()
        attn = "eager (token selection reads attention probabilities)"
    else:
        model = AutoModelForQuestionAnswering.from_config(config, attn_implementation=attn).eval()
        attn = model.config._attn_implementation
    predict, vocab = _torch_predictor(model, **length), config.vocab_size
    size = sum(p.numel() * p.element_size() for p in model.parameters())

    def clamped(inputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        # The tokenizer's ids may exceed a shrunk random vocabulary (tests); ids do not change the cost.
        return predict({**inputs, "input_ids": inputs["input_ids"].clamp(max=vocab - 1)})

    return clamped, {"attn_implementation": attn, "size_bytes": size, "size_kind": "parameter_bytes"}


def transformers_model(path: str | Path, attn_implementation: str = "sdpa") -> Any:
    """The checkpoint as a user loads it with transformers alone (a qala directory is also one)."""
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering.from_pretrained(str(path), attn_implementation=attn_implementation).eval()


def _plain_export(spec: Mapping[str, Any], work_dir: Path) -> tuple[Path, Any, dict[str, Any]]:
    """transformers' QA model of the row's directory exported as a user would (qala.quantize.onnx's plain
    graph: dynamic batch and sequence axes, no qala code in it); (file, config, facts)."""
    from qala.quantize.onnx import export_onnx

    model = transformers_model(spec["path"], attn_implementation="eager")
    start = time.perf_counter()
    export_onnx(model, work_dir / "model.onnx", graph="plain")
    return work_dir / "model.onnx", model.config, {"export_seconds": round(time.perf_counter() - start, 2)}


def onnx_model(
    spec: Mapping[str, Any], work_dir: Path, example: Any = None, *, fused: bool | None = None
) -> tuple[Predictor, dict[str, Any]]:
    """(predict, facts) of the ONNX Runtime peer: the plain export (`fused`, default: engine onnxruntime-fused,
    through ORT's transformer optimizer), fp32 or dynamic INT8 of that graph. A row with a length_config (the
    padded table) runs qala's adaptive graph at that configuration instead."""
    import onnxruntime as ort

    from qala.model import LengthAdaptiveForQuestionAnswering
    from qala.quantize import onnx as qonnx

    if "keep_ratios" in length_kwargs(spec):
        raise ValueError(f"ONNX Runtime rows take full length or a length_config, no keep ratios: {spec['id']}")
    int8, facts = spec["dtype"] == "int8", {"size_kind": "onnx file", "onnxruntime": ort.__version__}
    if spec.get("length_config") is not None:
        model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(spec["path"])).eval()
        engine = qonnx.OnnxEngine(model, int8=int8, workdir=work_dir, threads=spec.get("threads"))
        engine.session("adaptive")
        facts.update(size_bytes=Path(engine.facts["adaptive_graph"]).stat().st_size, graph="qala adaptive")
        facts.update({"quantization": engine.facts["quantization"]} if int8 else {})
        return _torch_predictor(engine, length_config=list(spec["length_config"])), facts
    # The settings of qala's ORT rows too (qala.quantize.onnx): ORT_ENABLE_ALL (InferenceSession's default) on
    # the row's threads; INT8 = quantize_dynamic with QInt8 weights per channel (its own default: per tensor).
    path, config, exported = _plain_export(spec, work_dir)
    facts.update(exported)
    if fused if fused is not None else spec.get("engine") == "onnxruntime-fused":
        facts["fused_operators"] = qonnx.optimize_onnx(path, work_dir / "model.fused.onnx", config)
        path = work_dir / "model.fused.onnx"
    if int8:
        qonnx.quantize_onnx(path, path.with_suffix(".int8.onnx"))
        path, facts["quantization"] = path.with_suffix(".int8.onnx"), qonnx.ORT_INT8_METHOD
    session = qonnx.ort_session(path, spec.get("threads"))
    names, facts["size_bytes"] = [i.name for i in session.get_inputs()], path.stat().st_size
    return (lambda batch: tuple(session.run(None, qonnx.numpy_feeds(batch, names)))), facts


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
        facts.update(quantization=f"{qov.NNCF_METHOD}, {len(feeds)} windows")
        facts["nncf_seconds"] = round(time.perf_counter() - start, 1)
    # f32 where not INT8 whatever the CPU; a "bf16" row asks for bf16 (OpenVINO's own default on bf16 CPUs).
    precision = "bf16" if spec["dtype"] == "bf16" else "f32"
    compiled = qov.compile_model(model, threads=spec.get("threads"), precision=precision)
    request = compiled.create_infer_request()
    facts.update(size_bytes=path.stat().st_size, size_kind="onnx file (fp32)", openvino=ov.__version__)
    facts["inference_precision"] = precision
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
    window = {"max_seq_length": spec["max_seq_length"], "doc_stride": spec["doc_stride"]}
    return training_windows(
        wanted["data"], AutoTokenizer.from_pretrained(spec["tokenizer"]), count=wanted["windows"], **window
    )


# --------------------------------------------------------------------------- the engines, by name


def _qala_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    """qala's model: a directory through load_model (INT8 compiled per shape when the row says so) or a named
    serving engine; with `arch`, qala's token dropping on random weights (Dynamic-TinyBERT, speed only)."""
    from qala.bench.plan import requantizes
    from qala.quantize.load import load_model, model_kind

    length = length_kwargs(spec)
    if spec.get("arch"):
        return _random_model(spec["arch"], length, None)
    # An engine that quantizes by itself (onnxruntime-int8) reads the fp32 model for an int8 row; onnxruntime-inc
    # reads the INT8 artifact, as eager does.
    expected = "fp32" if requantizes(spec.get("backend")) else spec["dtype"]
    if model_kind(spec["path"]) != expected:
        raise ValueError(f"{spec['path']} is an {model_kind(spec['path'])} model directory, the row is {spec['dtype']}")
    if spec.get("backend"):
        return _serving_engine(spec, work_dir, example, length)
    compiled = spec["dtype"] == "int8" and bool(spec.get("compiled"))
    model = load_model(spec["path"], compiled=compiled, expect=spec["dtype"])
    facts = {"compiled": compiled, "warm_every_shape": compiled, "size_kind": "directory"}
    return _torch_predictor(model, **length), {**facts, "size_bytes": directory_bytes(spec["path"])}


def _serving_engine(
    spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any], length: Mapping[str, Any]
) -> tuple[Predictor, dict]:
    """A qala row through a named engine of qala.quantize.engines (the one registry)."""
    from qala.bench.plan import requantizes
    from qala.quantize.engines import make_engine, warm_for_serving

    backend, options = spec["backend"], {}
    if backend.startswith(("onnxruntime", "openvino")):
        options.update(workdir=str(work_dir), threads=spec.get("threads"))
    if backend.startswith("openvino"):
        options.update(
            max_seq_length=spec["max_seq_length"], **({"buckets": spec["buckets"]} if spec.get("buckets") else {})
        )
        # NNCF (openvino-int8) quantizes on training windows; openvino-inc has INC's scales already.
        options.update({"calibration": calibration_windows(spec)} if requantizes(backend) else {})
    engine = make_engine(spec["path"], backend, **options)
    facts: dict[str, Any] = {"backend": backend, **getattr(engine, "facts", {})}
    if backend.startswith("openvino"):
        # Compile every (bucket, batch size) a request of up to `example`'s windows can split into, before timing.
        warm = warm_for_serving(engine, lengths=[], max_batch=example["input_ids"].size(0), configs=[length])
        facts.update(warmup=warm, compiled_models=len(engine._compiled))
    # Every request shape is still run once before timing (qala.bench's rule for any engine that may build
    # per shape); an engine with dynamic shapes makes that cheap.
    facts["warm_every_shape"] = backend != "eager"
    return _torch_predictor(engine, **length), facts


def _transformers_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    attn = spec.get("attn_implementation") or "sdpa"
    if spec.get("arch"):
        return _random_model(spec["arch"], {}, attn)
    return _torch_predictor(transformers_model(spec["path"], attn)), {"attn_implementation": attn}


def _openvino_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    if spec.get("length_config") is not None:
        raise ValueError(f"engine 'openvino' cannot run length_config {spec['length_config']}: full length only")
    return openvino_model(spec, work_dir, calibration_windows(spec) if spec["dtype"] == "int8" else [])


def _ipex_engine(spec: Mapping[str, Any], work_dir: Path, example: Mapping[str, Any]) -> tuple[Predictor, dict]:
    # Runs under the recipe's benchmark.ipex_python (torch 2.8, IPEX 2.8, qala installed with --no-deps): the INT8
    # model `python -m qala.bench.ipex` calibrated and scored, one frozen trace per (configuration, shape); a
    # shape's first call builds its trace (never timed).
    from qala.quantize.ipex import timing_callable

    if "keep_ratios" in length_kwargs(spec):
        raise ValueError("IPEX rows take absolute length configurations (traced top-k sizes), not keep ratios")
    call, facts = timing_callable(spec["path"], spec.get("length_config"), example, summaries=spec["ipex_summaries"])
    size = {"size_bytes": directory_bytes(spec["path"]), "size_kind": "directory (fp32 model + calibration)"}
    return (lambda inputs: tuple(t.float().numpy() for t in call(inputs))), {**facts, "warm_every_shape": True, **size}


# Engines by name (never by import path): what a row spec's "engine" may say.
ENGINES: dict[str, Engine] = {
    "qala": _qala_engine,
    "transformers": _transformers_engine,
    "onnxruntime": onnx_model,
    "onnxruntime-fused": onnx_model,
    "openvino": _openvino_engine,
    "ipex": _ipex_engine,
}
