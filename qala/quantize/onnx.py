"""The one ONNX exporter, ONNX Runtime session builder and ORT quantizer of qala's engines and of the peers.

Two graphs, both from the fp32 weights (an INC/PT2E INT8 artifact is exported from its fp32 source):

- "plain": transformers' `<Arch>ForQuestionAnswering` with the model's weights (qala's forward at full
  length is exactly that model), dynamic batch and sequence axes. No token-selection op at all. This is
  what a user would export, so the ONNX Runtime and OpenVINO peers run it too, and the graph that
  `onnxruntime.transformers.optimizer` fuses (Attention, SkipLayerNorm, BiasGelu).
- "adaptive": qala's length-adaptive forward with the token selection in the graph (qala.model's
  `select_tokens`/`_restore`, shared with the PyTorch forward). Its fourth input `kept`
  (int64 [batch, layers]) says how many tokens each row keeps after each layer, computed on the host by
  `qala.lengths.kept_table` (one row per window). The top-k WIDTH of layer i is
  either the batch's largest count (`widths=None`: one graph for every length and configuration, what
  the ONNX Runtime engine runs) or static for the window length L: ceil(share_i * L), capped
  (`Widths`, one graph per configuration; with a static input shape OpenVINO folds it to a constant,
  see qala.quantize.openvino). Either way each row keeps exactly its own count (surplus slots masked).
  The dynamic-width graph has a fifth input `margins` (float32 [batch, layers], inf: none): after layer i a row
  keeps at most the tokens whose significance is within margins[:, i] of its best (qala.model.kept_within_margin,
  the model's keep_margins), so its count depends on the window and is computed in the graph. Static widths
  (OpenVINO) take no margins: there a margin would only mask slots that are computed anyway.

INT8 here is ONNX Runtime's dynamic quantization (`quantize_onnx`: int8 weights per channel, activations
quantized per call) of either graph; it re-quantizes the fp32 model on its own (not INC's configuration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from qala.lengths import config_key, kept_table
from qala.model import (
    MODEL_INPUTS,
    LengthAdaptiveForQuestionAnswering,
    _restore,
    kept_within_margin,
    select_tokens,
    token_significance,
)
from qala.quantize.engines import first_margin_layer, margin_table

logger = logging.getLogger(__name__)

INSTALL_HINT = "ONNX Runtime backends need the onnx extra: pip install -e '.[onnx]' (onnx, onnxruntime, onnxscript)"
OPSET = 17
ADAPTIVE_INPUTS = (*MODEL_INPUTS, "kept", "margins")
# In the dynamic adaptive graph's file names (graph_file): its folder is keyed by the weights alone, so files of an
# earlier export (2: the `margins` input added) must not be read for this one.
ADAPTIVE_FORMAT = 2
OUTPUT_NAMES = ("start_logits", "end_logits")
# Static widths are computed in integers: share_i as ceil(share_i * SCALE) / SCALE (never below the share,
# so a width is never narrower than a row's count), exact in int32 for L * SCALE < 2**31.
SCALE = 1_000_000
# quantize_onnx's one setting, recorded in every row that uses it.
ORT_INT8_METHOD = "onnxruntime.quantization.quantize_dynamic, QInt8 weights per channel, activations per call"


def require_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return onnxruntime


# --------------------------------------------------------------------------- what a call keeps


@dataclass(frozen=True)
class Widths:
    """Static top-k widths of the adaptive graph: layer i keeps min(ceil(shares[i] * L), caps[i], L) slots of a
    window of L positions, where L comes from the input's shape (a constant once the shape is static)."""

    shares: tuple[float, ...]
    caps: tuple[int | None, ...]

    @classmethod
    def of(cls, key: tuple[str, tuple[float, ...]]) -> Widths:
        mode, values = key
        if mode == "ratio":
            return cls(tuple(values), (None,) * len(values))
        return cls((1.0,) * len(values), tuple(int(k) for k in values))

    def at(self, length: int) -> list[int]:
        """The widths for a window of `length` positions (what the traced graph computes)."""
        out = []
        for share, cap in zip(self.shares, self.caps, strict=True):
            width = min(max((math.ceil(share * SCALE) * length + SCALE - 1) // SCALE, 1), length)
            out.append(min(width, cap) if cap is not None else width)
        return out


# --------------------------------------------------------------------------- the two graphs


def plain_model(model: nn.Module) -> nn.Module:
    """transformers' QA model with these weights (qala's full-length forward), eager attention, eval mode."""
    from transformers import AutoModelForQuestionAnswering

    if not isinstance(model, LengthAdaptiveForQuestionAnswering):
        return model.eval()
    plain = AutoModelForQuestionAnswering.from_config(model.config, attn_implementation="eager")
    plain.load_state_dict(model.state_dict())
    return plain.eval()


class _PlainGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.start_logits, out.end_logits


class AdaptiveGraph(nn.Module):
    """qala's length-adaptive forward with every length decision made from tensors (one trace, all inputs).

    Same arithmetic as LengthAdaptiveForQuestionAnswering.forward given the same per-row counts (selection
    at every layer; keeping all of a row's tokens is an identity selection on its real positions). The leading
    layers at keep ratio 1.0 skip the selection altogether: with static `widths` (OpenVINO) those the widths
    say; with dynamic widths (ONNX Runtime) the first `full_prefix`, one graph per prefix (the caller feeds
    only configurations whose first `full_prefix` ratios are 1.0 and margins inf for every row). `margins`
    (dynamic widths only): each row's keep margin per layer, inf where none.
    """

    def __init__(
        self, model: LengthAdaptiveForQuestionAnswering, widths: Widths | None = None, full_prefix: int = 0
    ) -> None:
        super().__init__()
        self.model = model
        self.widths = widths
        # Leading layers whose static width keeps every position (ratio 1.0, no cap): no selection op runs there.
        self.full_prefix = full_prefix if widths is None else 0
        while widths is not None and self.full_prefix < len(widths.shares):
            if widths.shares[self.full_prefix] < 1.0 or widths.caps[self.full_prefix] is not None:
                break
            self.full_prefix += 1

    def width(self, i: int, kept: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        if self.widths is None:
            return kept.max()
        share, cap = self.widths.shares[i], self.widths.caps[i]
        # Integer ceil(share * L): OpenVINO may run floats and int64 in 32 bits; this stays exact.
        width = (seq * math.ceil(share * SCALE) + (SCALE - 1)) // SCALE
        width = torch.minimum(width.clamp(min=1), seq)
        return torch.clamp(width, max=cap) if cap is not None else width

    def forward(self, input_ids, attention_mask, token_type_ids, kept, margins=None):
        model = self.model
        backbone = model.backbone
        mask = attention_mask.bool()
        hidden = backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        batch_size, seq_length, _ = hidden.shape
        # The window length as a tensor of the graph (a traced Python int would be a constant).
        seq = torch.ones_like(input_ids[0]).sum()
        positions = torch.arange(seq_length, device=hidden.device).unsqueeze(0).expand(batch_size, -1)
        restored = torch.zeros_like(hidden)
        carried = torch.ones_like(mask)
        for i, layer in enumerate(backbone.encoder.layer):
            additive_mask = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
            if i < self.full_prefix:
                # Keep ratio 1.0 with nothing dropped before: every row keeps all its real tokens, an identity
                # selection, so the layer runs as in the plain graph (no scores, top-k, gathers or restore).
                hidden = layer.feed_forward_chunk(layer.attention(hidden, additive_mask)[0])
                continue
            attention_output, attention_probs = layer.attention(hidden, additive_mask)
            kept_i = torch.minimum(kept[:, i], mask.sum(dim=1))
            restored = _restore(restored, positions, hidden, carried)
            significance = token_significance(
                model.qala_config.selection,
                mask,
                attention_probs=attention_probs,
                attention_output=attention_output,
                qa_outputs=model.qa_outputs,
            )
            if margins is not None:
                kept_i = kept_within_margin(significance, margins[:, i], kept_i, mask)
            attention_output, mask, carried, positions = select_tokens(
                significance, kept_i, self.width(i, kept_i, seq), attention_output, mask, carried, positions
            )
            hidden = layer.feed_forward_chunk(attention_output)
        hidden = _restore(restored, positions, hidden, carried)
        logits = model.qa_outputs(hidden)
        return logits[..., 0], logits[..., 1]


def export_onnx(
    model: nn.Module, path: str | Path, *, graph: str = "plain", widths: Widths | None = None, full_prefix: int = 0
) -> Path:
    """Export `graph` ("plain" or "adaptive", see the module doc) of the fp32 `model` to `path`.

    Dynamic batch and sequence axes. `model`: a qala model, or (plain only) any transformers QA model.
    `widths` / `full_prefix`: the adaptive graph's static widths, or its leading layers without selection; without
    static widths the adaptive graph also takes `margins` (ADAPTIVE_INPUTS).
    """
    require_onnxruntime()
    if graph not in ("plain", "adaptive"):
        raise ValueError(f"graph must be 'plain' or 'adaptive', got {graph!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seq = 16
    example: tuple[torch.Tensor, ...] = (
        torch.full((2, seq), 7, dtype=torch.long),
        torch.ones(2, seq, dtype=torch.long),
        torch.zeros(2, seq, dtype=torch.long),
    )
    example[1][1, seq // 2 :] = 0  # a padded row, so that no mask-dependent branch is traced as constant
    axes = {name: {0: "batch", 1: "seq"} for name in (*MODEL_INPUTS, *OUTPUT_NAMES)}
    if graph == "plain":
        wrapper, names = _PlainGraph(plain_model(model)), MODEL_INPUTS
    else:
        if not isinstance(model, LengthAdaptiveForQuestionAnswering):
            raise ValueError("the adaptive graph needs a qala LengthAdaptiveForQuestionAnswering model")
        wrapper, names = AdaptiveGraph(model, widths, full_prefix), ADAPTIVE_INPUTS
        example += (kept_table(example[1], model.num_layers, keep_ratios=[0.5] * model.num_layers),)
        axes["kept"] = {0: "batch"}
        if widths is None:
            margins = torch.full((2, model.num_layers), math.inf)
            margins[0] = 3.0  # a finite margin in one row, an unbounded one in the other
            example += (margins,)
            axes["margins"] = {0: "batch"}
        else:
            names = names[:-1]
    with torch.no_grad():
        # The TorchScript exporter: TopK's k stays a tensor computed in the graph (the dynamo exporter
        # would make it an unbacked symbol that torch.export cannot reason about).
        torch.onnx.export(
            wrapper.eval(),
            example,
            str(path),
            input_names=list(names),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


# --------------------------------------------------------------------------- ONNX Runtime: fuse, quantize, run


def optimize_onnx(fp32_path: str | Path, out_path: str | Path, config: Any) -> dict[str, int]:
    """onnxruntime.transformers.optimizer over a plain BERT graph (fused Attention, SkipLayerNorm, BiasGelu,
    EmbedLayerNormalization); returns the fused operators it counted."""
    require_onnxruntime()
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(
        str(fp32_path),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        opt_level=1,
    )
    optimized.save_model_to_file(str(out_path))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """ONNX Runtime dynamic INT8 (ORT_INT8_METHOD) of an fp32 graph, fused or not."""
    require_onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused operators (com.microsoft domain) defeat ONNX shape inference; their outputs are float.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(str(fp32_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8, extra_options=extra)
    return Path(int8_path)


# ONNX Runtime's intra-op threads spin while they wait for work: fastest when the process has the cores to
# itself (qala.answer, benchmarks), harmful where other threads need them. qala.serve turns it off: its event
# loop, HTTP parsing and tokenization share the cores with the model. Ad hoc runs of benchmarks/serve_load.py
# (32 closed-loop clients, 512 dev questions, 2 threads, 2 cores of an AMD EPYC Zen 5, 2026-12-05): 105.6
# answers/s served without spinning against 80.6 with it; in-process, spinning is faster (151.1 vs 137.5).
# Sessions made after a change follow it.
SPIN_WAIT = True


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """The one ONNX Runtime CPU session of qala and the peers: all graph optimizations (ORT_ENABLE_ALL, also
    InferenceSession's default), `threads` intra-op threads (default: torch's), one inter-op thread (unused in
    ORT's default sequential execution)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not SPIN_WAIT:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def operator_types(path: str | Path) -> set[str]:
    """The operator types of an ONNX file (tests check that an INT8 graph runs integer kernels)."""
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


# --------------------------------------------------------------------------- content-keyed artifacts


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the model's configs and weights: the key of every artifact built from it."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string().encode())
    qala_config = getattr(model, "qala_config", None)
    if qala_config is not None:
        digest.update(qala_config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def artifact_dir(root: str | Path, model: nn.Module) -> Path:
    """root/<content hash>/: where exported and compiled files of this model live.

    The folder is named by the weights' hash and its manifest repeats it: a model whose files changed
    gets a new folder (artifacts of the old weights are never used), and a folder whose manifest names
    other weights is refused.
    """
    digest = model_digest(model)
    folder = Path(root) / digest[:16]
    manifest = folder / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("model_sha256")
        if recorded != digest:
            raise ValueError(
                f"artifact cache {folder} was built for model {recorded}, not this model ({digest}): remove it"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"model_sha256": digest, "format": "qala-engine-artifacts/1"}) + "\n")
    return folder


def graph_file(graph: str) -> str:
    """The file name of an OnnxEngine graph: "plain", or "adaptive" / "adaptive.prefixN" with ADAPTIVE_FORMAT."""
    kind, dot, rest = graph.partition(".")
    return f"{graph}.onnx" if kind == "plain" else f"{kind}-v{ADAPTIVE_FORMAT}{dot}{rest}.onnx"


def key_slug(key: tuple[str, tuple[float, ...]] | None) -> str:
    if key is None:
        return "full"
    mode, values = key
    text = "-".join(f"{v:g}" for v in values)
    return f"{'kr' if mode == 'ratio' else 'lc'}-{text}"


# --------------------------------------------------------------------------- the ONNX Runtime engine


class OnnxEngine:
    """qala on ONNX Runtime, called like the model.

    Full length (no configuration, ratios all 1.0, no margin): the plain graph, fused by ORT's transformer
    optimizer (INT8: that fused graph quantized). A keep configuration or keep margins: the adaptive graph with
    dynamic widths (one file for every length and configuration; per-row [batch, layers] ratios and margins too),
    one per count of leading layers at ratio 1.0 without a margin, which run without selection (at most one file
    per layer). `keep_margins` None is the model config's, as in the model's forward.
    """

    def __init__(
        self,
        model: LengthAdaptiveForQuestionAnswering,
        *,
        int8: bool = False,
        workdir: str | Path | None = None,
        threads: int | None = None,
        fused: bool = True,
    ) -> None:
        import tempfile

        require_onnxruntime()
        self.name = "onnxruntime-int8" if int8 else "onnxruntime"
        self.model, self.int8, self.fused, self.threads = model, int8, fused, threads
        self.num_layers = model.num_layers
        self.keep_margins = model.qala_config.keep_margins
        root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qala-onnx-"))
        self.folder = artifact_dir(root, model)
        self.facts: dict[str, Any] = {"quantization": ORT_INT8_METHOD if int8 else None}
        self._sessions: dict[str, Any] = {}
        start = time.perf_counter()
        self.session("plain")
        self.build_seconds = time.perf_counter() - start

    def _file(self, graph: str) -> Path:
        fp32 = self.folder / graph_file(graph)
        if not fp32.is_file():
            kind, _, prefix = graph.partition(".prefix")
            export_onnx(self.model, fp32, graph=kind, full_prefix=int(prefix or 0))
        path = fp32
        if graph == "plain" and self.fused:
            path = self.folder / "plain.fused.onnx"
            if not path.is_file():
                self.facts["fused_operators"] = optimize_onnx(fp32, path, self.model.config)
        if self.int8:
            int8 = path.with_suffix(".int8.onnx")
            if not int8.is_file():
                quantize_onnx(path, int8)
            path = int8
        return path

    def session(self, graph: str) -> Any:
        if graph not in self._sessions:
            path = self._file(graph)
            self._sessions[graph] = ort_session(path, self.threads)
            self.facts[f"{graph}_graph"] = str(path)
        return self._sessions[graph]

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        keep_ratios: Sequence[float] | torch.Tensor | None = None,
        length_config: Sequence[int] | None = None,
        keep_margins: Sequence[float | None] | torch.Tensor | None = None,
    ) -> QuestionAnsweringModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        batch = input_ids.size(0)
        margins = margin_table(self.keep_margins if keep_margins is None else keep_margins, batch, self.num_layers)
        feeds = {
            "input_ids": input_ids.numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.numpy().astype(np.int64, copy=False),
            "token_type_ids": token_type_ids.numpy().astype(np.int64, copy=False),
        }
        per_row = isinstance(keep_ratios, torch.Tensor) and keep_ratios.dim() == 2
        key = None if per_row else config_key(self.num_layers, keep_ratios, length_config)
        if per_row or key is not None or margins is not None:
            feeds["kept"] = kept_table(attention_mask, self.num_layers, keep_ratios, length_config).numpy()
            no_margin = torch.full((batch, self.num_layers), math.inf, dtype=torch.float32)
            feeds["margins"] = (no_margin if margins is None else margins).numpy()
            prefix = self.num_layers if keep_ratios is None else full_prefix(keep_ratios)
            prefix = 0 if length_config is not None else prefix
            if margins is not None:  # a margin drops tokens at a layer of ratio 1.0 too
                prefix = min(prefix, first_margin_layer(margins))
            session = self.session("adaptive" if prefix == 0 else f"adaptive.prefix{prefix}")
        else:
            session = self.session("plain")
        # A graph whose every layer skips the selection (per-row ratios all 1.0) reads neither kept nor margins.
        names = {i.name for i in session.get_inputs()}
        start, end = session.run(list(OUTPUT_NAMES), {k: v for k, v in feeds.items() if k in names})
        return QuestionAnsweringModelOutput(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))

    def warmup(self, lengths: Sequence[int] = (16, 128, 384), **_: Any) -> dict[str, float]:
        """ONNX Runtime has nothing to compile per shape; one call per length fills its allocator arenas."""
        start = time.perf_counter()
        for n in lengths:
            ids = (torch.arange(int(n)) % 7 + 1)[None, :]
            self(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
        return {"warmup_seconds": time.perf_counter() - start}


def full_prefix(keep_ratios: Sequence[float] | torch.Tensor) -> int:
    """How many leading layers keep ratio 1.0 (in every row, for a [batch, layers] tensor)."""
    table = torch.as_tensor(keep_ratios, dtype=torch.float64)
    full = (table.reshape(-1, table.size(-1)) >= 1.0).all(dim=0).tolist()
    return full.index(False) if False in full else len(full)


def numpy_feeds(inputs: Mapping[str, Any], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Model inputs (torch tensors or arrays) as int64 numpy arrays, for the named graph inputs."""
    return {k: np.asarray(inputs[k], dtype=np.int64) for k in names}
