"""The models a benchmark compares qala with: published architectures with random weights, plain
transformers, and what a user would run the same checkpoint with: ONNX Runtime (fp32 and dynamic INT8,
plain or through ORT's transformer fusions) and OpenVINO (fp32 and NNCF INT8), all on transformers'
plain ONNX export made by qala.quantize.onnx (the one exporter and session builder of qala's engines too).

Every import of a peer's library is local, so a worker in another environment (IPEX's torch 2.8)
imports only what its row needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qala.model import MODEL_INPUTS

# Random-weight rows are seeded: speed does not depend on the weights, but a run should be repeatable.
RANDOM_WEIGHTS_SEED = 0


def call_model(model: Callable[..., Any], inputs: Mapping[str, Any], **length: Any) -> Any:
    """One inference call of a torch model (eager module or CompiledQA) without autograd.

    `length` is what the call keeps: length_config=[...] (absolute), keep_ratios=[...] (relative), or
    nothing (full length); None values are dropped so plain transformers models get no extra argument.
    """
    import torch

    kwargs = {k: v for k, v in length.items() if v is not None}
    with torch.no_grad():
        return model(**inputs, **kwargs)


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


def onnx_model(
    spec: Mapping[str, Any], work_dir: Path, *, fused: bool = False
) -> tuple[Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """(call(batch of tensors) -> (start, end) numpy logits, facts) of the ONNX Runtime peer: the plain export
    (with `fused`, through ORT's transformer optimizer), fp32 or dynamic INT8 of that graph. A row with a
    length_config (the padded table) runs qala's adaptive graph at that configuration instead."""
    import onnxruntime as ort

    from qala.quantize import onnx as qonnx

    if spec.get("length_config") is not None:
        return _onnx_adaptive(spec, work_dir)
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

    def call(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        start, end = session.run(None, qonnx.numpy_feeds(batch, names))
        return start, end

    return call, facts


def _onnx_adaptive(spec: Mapping[str, Any], work_dir: Path) -> tuple[Callable, dict[str, Any]]:
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

    def call(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        out = engine(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, length_config=lengths)
        return out.start_logits.numpy(), out.end_logits.numpy()

    return call, facts


def onnx_row(spec: Mapping[str, Any], work_dir: Path, facts: dict[str, Any]) -> tuple[Callable, dict[str, Any], None]:
    """The padded table's ONNX Runtime row: export at a fixed length configuration, optionally quantize."""
    call, more = onnx_model(spec, work_dir)
    return call, {**facts, **more}, None


def openvino_model(
    spec: Mapping[str, Any], work_dir: Path, calibration: Sequence[Mapping[str, Any]] = ()
) -> tuple[Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """The OpenVINO peer: the plain export read by OpenVINO with dynamic shapes, fp32, or INT8 by NNCF
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
    compiled = qov.compile_model(model, threads=spec.get("threads"))
    request = compiled.create_infer_request()
    facts.update(size_bytes=path.stat().st_size, size_kind="onnx file (fp32)", openvino=ov.__version__)
    if spec["dtype"] == "int8":
        facts["int8_layers"] = {k: v for k, v in qov.int8_precisions(compiled).items() if k.endswith(("u8", "i8"))}

    def call(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        request.infer({k: np.asarray(batch[k], dtype=np.int64) for k in MODEL_INPUTS})
        return request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy()

    return call, facts
