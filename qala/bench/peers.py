"""The models a benchmark compares qala with: published architectures with random weights, plain
transformers, and ONNX Runtime (fp32 and dynamic INT8) exports of a qala model.

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


def export_onnx(
    path: str | Path,
    out_file: Path,
    *,
    length_config: Sequence[int] | None = None,
    seq_length: int = 384,
    dynamic_sequence: bool = False,
) -> float:
    """Export the qala model in `path` to ONNX; returns the export seconds.

    With a length configuration the top-k sizes are traced constants (one graph per configuration, fixed
    sequence length). With `dynamic_sequence` (full length only) batch and sequence are both dynamic
    axes, so unpadded windows of any length run through one graph.
    """
    import torch

    from qala.model import LengthAdaptiveForQuestionAnswering

    if dynamic_sequence and length_config is not None:
        raise ValueError("a dynamic sequence axis needs full length: top-k sizes of a configuration are constants")
    model = LengthAdaptiveForQuestionAnswering.from_pretrained(str(path)).eval()

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids, attention_mask, token_type_ids, length_config=length_config)
            return out.start_logits, out.end_logits

    out_file.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(torch.ones(2, seq_length, dtype=torch.long) for _ in MODEL_INPUTS)
    axes = {0: "batch", 1: "sequence"} if dynamic_sequence else {0: "batch"}
    dynamic_axes = {name: axes for name in MODEL_INPUTS}
    if dynamic_sequence:
        dynamic_axes.update({"start_logits": axes, "end_logits": axes})
    start = time.perf_counter()
    # The TorchScript exporter takes the top-k sizes as traced constants; the wrapper is put in eval
    # mode explicitly (the exporter restores the training flag recursively).
    torch.onnx.export(
        Exported().eval(),
        example,
        str(out_file),
        input_names=list(MODEL_INPUTS),
        output_names=["start_logits", "end_logits"],
        dynamic_axes=dynamic_axes,
        dynamo=False,
    )
    return round(time.perf_counter() - start, 2)


def quantize_onnx(fp32_file: Path, int8_file: Path) -> str:
    """ONNX Runtime's dynamic INT8 (int8 weights, activations quantized per call); returns the method."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_file), str(int8_file), weight_type=QuantType.QInt8)
    return "onnxruntime.quantization.quantize_dynamic, QInt8 weights"


def onnx_session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session with as many intra-op threads as the torch rows get."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_model(
    spec: Mapping[str, Any], work_dir: Path, *, dynamic_sequence: bool = False
) -> tuple[Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """(call(batch of tensors) -> (start, end) numpy logits, facts) of an fp32 or dynamic INT8 export."""
    import onnxruntime as ort

    facts: dict[str, Any] = {}
    fp32_file = work_dir / "model.onnx"
    facts["export_seconds"] = export_onnx(
        spec["path"],
        fp32_file,
        length_config=spec.get("length_config"),
        seq_length=spec.get("seq_length", 384),
        dynamic_sequence=dynamic_sequence,
    )
    path = fp32_file
    if spec["dtype"] == "int8":
        path = work_dir / "model.int8.onnx"
        facts["quantization"] = quantize_onnx(fp32_file, path)
    session = onnx_session(path, spec.get("threads"))
    names = [i.name for i in session.get_inputs()]
    facts.update(size_bytes=path.stat().st_size, size_kind="onnx file", onnxruntime=ort.__version__)

    def call(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        start, end = session.run(None, {k: np.asarray(batch[k]) for k in names})
        return start, end

    return call, facts


def onnx_row(spec: Mapping[str, Any], work_dir: Path, facts: dict[str, Any]) -> tuple[Callable, dict[str, Any], None]:
    """The padded table's ONNX Runtime row: export at a fixed length configuration, optionally quantize."""
    call, more = onnx_model(spec, work_dir)
    return call, {**facts, **more}, None
