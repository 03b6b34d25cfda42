"""ONNX Runtime backend: the length-adaptive model exported as ONE graph with dynamic batch and sequence axes.

The token selection is in the graph, not in Python: per layer, each row keeps
k_b = min(ceil(r_i * n_b), tokens it still has) tokens, n_b being the row's real length (attention_mask
sum), as TopK with k = max_b k_b computed in-graph, the surplus ranks of shorter rows masked (as
qala/model.py does). Drop-and-Restore is GatherElements / ScatterElements. The per-layer keep ratios
are an INPUT of the graph (`keep_ratios`, float64 [batch, layers], one row per window), so one file
serves full length (all 1.0) and every relative configuration; an absolute `length_config` is served
as per-row ratios (k - 0.5) / n_b, which keep exactly min(k, n_b) real tokens: the same real tokens as
the PyTorch model's absolute mode, so the logits at real positions agree.

INT8: ONNX Runtime's dynamic quantization (`quantize_dynamic`, per-channel int8 weights, activations
quantized per call) of the exported fp32 graph. Only the fp32 weights of a qala model are exported:
an INC/PT2E INT8 artifact is exported from its fp32 source weights (qala.quantize.fp32_state_dict).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from qala.model import MODEL_INPUTS, LengthAdaptiveForQuestionAnswering, _restore, attention_significance
from qala.quantize.engines import ratio_table

logger = logging.getLogger(__name__)

INSTALL_HINT = "ONNX Runtime backends need the onnx extra: pip install -e '.[onnx]' (onnx, onnxruntime, onnxscript)"
OPSET = 17
INPUT_NAMES = (*MODEL_INPUTS, "keep_ratios")
OUTPUT_NAMES = ("start_logits", "end_logits")


def require_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return onnxruntime


class TraceableLengthAdaptive(nn.Module):
    """qala's forward with every length decision made from tensors, so that one trace serves all inputs.

    Same arithmetic as LengthAdaptiveForQuestionAnswering.forward with `keep_ratios` (selection at
    every layer; keeping all tokens is an identity selection, so full length = ratios of 1.0).
    """

    def __init__(self, model: LengthAdaptiveForQuestionAnswering) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        keep_ratios: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        backbone = model.backbone
        mask = attention_mask.bool()
        hidden = backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        batch_size, seq_length, hidden_size = hidden.shape
        real_lengths = mask.sum(dim=1)
        positions = torch.arange(seq_length, device=hidden.device).unsqueeze(0).expand(batch_size, -1)
        restored = torch.zeros_like(hidden)
        carried = torch.ones_like(mask)
        for i, layer in enumerate(backbone.encoder.layer):
            additive_mask = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
            attention_output, attention_probs = layer.attention(hidden, additive_mask)
            wanted = torch.ceil(keep_ratios[:, i].double() * real_lengths.double() - 1e-6).long().clamp(min=1)
            kept = torch.minimum(wanted, mask.sum(dim=1))
            restored = _restore(restored, positions, hidden, carried)
            significance = attention_significance(attention_probs, mask)
            top = significance.topk(kept.max(), dim=1).indices
            survives = torch.arange(top.size(1), device=top.device)[None, :] < kept[:, None]
            top, order = top.sort(dim=1)
            survives = survives.gather(1, order)
            attention_output = attention_output.gather(1, top.unsqueeze(-1).expand(-1, -1, hidden_size))
            mask = mask.gather(1, top) & survives
            carried = carried.gather(1, top) & survives
            positions = positions.gather(1, top)
            hidden = layer.feed_forward_chunk(attention_output)
        hidden = _restore(restored, positions, hidden, carried)
        logits = model.qa_outputs(hidden)
        return logits[..., 0], logits[..., 1]


def export_onnx(model: LengthAdaptiveForQuestionAnswering, path: str | Path) -> Path:
    """Export the fp32 length-adaptive model to `path` (dynamic batch and sequence axes)."""
    require_onnxruntime()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = TraceableLengthAdaptive(model).eval()
    seq = 16
    example = (
        torch.full((2, seq), 7, dtype=torch.long),
        torch.ones(2, seq, dtype=torch.long),
        torch.zeros(2, seq, dtype=torch.long),
        torch.full((2, model.num_layers), 0.5, dtype=torch.float64),
    )
    example[1][1, seq // 2 :] = 0  # a padded row, so that no mask-dependent branch is traced as constant
    axes = {name: {0: "batch", 1: "seq"} for name in MODEL_INPUTS}
    axes.update({name: {0: "batch", 1: "seq"} for name in OUTPUT_NAMES})
    axes["keep_ratios"] = {0: "batch"}
    with torch.no_grad():
        # The TorchScript exporter: TopK's k stays a tensor computed in the graph (the dynamo exporter
        # would make it an unbacked symbol that torch.export cannot reason about).
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, *, per_channel: bool = True) -> Path:
    """ONNX Runtime dynamic INT8 (int8 weights, per channel; activations quantized per call)."""
    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path), per_channel=per_channel, weight_type=QuantType.QInt8)
    return Path(int8_path)


class OnnxEngine:
    """An ONNX Runtime session called like the model: `engine(input_ids=..., keep_ratios=[...])`."""

    def __init__(self, path: str | Path, *, num_layers: int, threads: int | None = None) -> None:
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        start = time.perf_counter()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.load_seconds = time.perf_counter() - start
        self.num_layers = num_layers
        self.path = Path(path)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        keep_ratios: Sequence[float] | None = None,
        length_config: Sequence[int] | None = None,
    ) -> QuestionAnsweringModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        ratios = self.ratios(attention_mask, keep_ratios, length_config)
        feeds = {
            "input_ids": input_ids.numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.numpy().astype(np.int64, copy=False),
            "token_type_ids": token_type_ids.numpy().astype(np.int64, copy=False),
            "keep_ratios": ratios,
        }
        start, end = self.session.run(list(OUTPUT_NAMES), feeds)
        return QuestionAnsweringModelOutput(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))

    def ratios(
        self, attention_mask: torch.Tensor, keep_ratios: Sequence[float] | None, length_config: Sequence[int] | None
    ) -> np.ndarray:
        return ratio_table(attention_mask, self.num_layers, keep_ratios, length_config).numpy()

    def warmup(self, lengths: Sequence[int] = (16, 128, 384), **_: Any) -> dict[str, float]:
        """ONNX Runtime has nothing to compile per shape; one call per length fills its allocator arenas."""
        start = time.perf_counter()
        for n in lengths:
            ids = (torch.arange(int(n)) % 7 + 1)[None, :]
            self(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
        return {"warmup_seconds": time.perf_counter() - start}
