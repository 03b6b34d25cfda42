"""Serving engines: one callable per backend that runs windows of ANY length without a compile per request.

`make_engine(model_or_dir, backend)` returns an object called like the model,
`engine(input_ids=..., attention_mask=..., token_type_ids=..., keep_ratios=[...] | length_config=[...])`
and `keep_margins=[...]` (the model's per-layer logit margins under that cap; None: the model config's),
returning .start_logits / .end_logits (torch tensors), plus `warmup(lengths=..., batch_sizes=...)`, which a
server calls once at load so that no request waits for a compile. Backends, by name:

- "eager": the PyTorch model as is (fp32 or the INC PT2E INT8 units, reference kernels).
- "compile-dynamic": torch.compile(dynamic=True) over the whole forward, Inductor freezing for INT8
  units (oneDNN qlinear kernels survive symbolic shapes). Keep ratios are passed as a [batch, layers]
  float64 tensor and keep margins as a float32 one, so Dynamo guards neither on their values nor on the window
  length: after warm-up, a stream of lengths and configurations reuses the same graphs.
- "onnxruntime" / "onnxruntime-int8" (qala.quantize.onnx): full length runs transformers' plain graph
  fused by ORT's transformer optimizer (Attention, SkipLayerNorm, BiasGelu); a keep configuration runs
  the length-adaptive graph (dynamic axes, token selection in the graph, keep margins by its `margins` input).
  INT8 = ORT dynamic quantization, per channel, of those graphs (re-quantized by the engine, not INC's
  configuration).
- "onnxruntime-inc" (qala.quantize.qdq): an INC INT8 artifact only, as static QDQ ONNX on ONNX Runtime: INC's
  activation scales, int8 weights and fp32 units (integer GEMMs), full length and keep configurations;
  "openvino-inc" runs the same QDQ graph on OpenVINO (full length only). Both, given the artifact's directory,
  serve the graphs cached by its content (QdqCache) without rebuilding the INT8 model.
- "openvino" / "openvino-int8" (qala.quantize.openvino): static length buckets, one compiled model per
  (configuration, bucket, batch size); full length is the plain graph, a keep configuration the adaptive
  graph with static top-k widths per bucket. INT8 = NNCF post-training quantization on the calibration
  windows passed in (`calibration=`; re-quantized by the engine, not INC's configuration). Layers that are
  not INT8 run in f32 whatever OpenVINO's CPU default (bf16 where the CPU has AVX-512 BF16 or AMX);
  "openvino-bf16" asks for bf16 by name (other logits than fp32: served only when named). No keep margins
  (the OpenVINO engines and "openvino-inc" refuse them): with static widths a margin would save no compute.

An engine asked for a configuration it cannot run raises ValueError naming both.

Measured side by side with `python -m qala.bench RECIPE --table questions --qala-backend NAME ...` (docs/engines.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from qala import lengths
from qala.lengths import check_keep_ratios, constant_keep_ratios, own_tensor
from qala.model import LengthAdaptiveForQuestionAnswering
from qala.quantize.compile import DEFAULT_MAX_GRAPHS, compile_settings
from qala.quantize.units import quantized_units

logger = logging.getLogger(__name__)

# Lengths a warm-up visits by default: short, typical (SQuAD dev median 159, p90 250) and the longest window.
WARMUP_LENGTHS = (24, 64, 160, 250, 384)
# Dynamo specialises sizes 0 and 1, so batch 1 and batch >= 2 are different graphs: warm both when serving batches.
WARMUP_BATCH_SIZES = (1,)
# The keep ratio of the warm-up's token-dropping configurations; any ratio below 1 does.
WARMUP_KEEP = 0.8
# The margin of the warm-up's keep-margin calls: only the path matters (a margin table at every layer), not the value.
WARMUP_MARGIN = 4.0

Margins = Sequence[float | None] | torch.Tensor


def margin_table(
    keep_margins: Margins | None, batch: int, num_layers: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """keep_margins (a per-layer list, None: no margin at that layer; or a [batch, layers] tensor, inf: none) as a
    fresh float32 [batch, layers] table, inf where a layer has none; None when no layer of any row has a margin.

    float32: the significance the margin is subtracted from is float32, as in the eager forward's list form."""
    if keep_margins is None:
        return None
    if isinstance(keep_margins, torch.Tensor):
        if keep_margins.dim() != 2 or tuple(keep_margins.shape) != (batch, num_layers):
            raise ValueError(f"keep_margins tensor must be [{batch}, {num_layers}], got {list(keep_margins.shape)}")
        table = keep_margins.detach().to(device, torch.float32).clone(memory_format=torch.contiguous_format)
    else:
        values = list(keep_margins)
        if len(values) != num_layers:
            raise ValueError(f"keep_margins has {len(values)} entries, the model has {num_layers} layers")
        row = [float("inf") if m is None else float(m) for m in values]
        table = torch.tensor([row] * batch, dtype=torch.float32, device=device)
    if not bool((table >= 0).all()):  # NaN fails too
        raise ValueError(f"keep_margins entries must be >= 0 (or None / inf: no margin), got {keep_margins}")
    return table if bool(table.isfinite().any()) else None


def first_margin_layer(table: torch.Tensor) -> int:
    """The first layer where some row of a margin_table has a margin (the table has one somewhere)."""
    return int(table.isfinite().any(dim=0).to(torch.int8).argmax())


# Windows are grouped per this many tokens: a call pads a window by fewer positions than this.
BUCKET_STEP = 32


def default_buckets(max_seq_length: int, step: int = BUCKET_STEP) -> tuple[int, ...]:
    """step, 2*step, ... up to max_seq_length (always the last bucket)."""
    return tuple(sorted({*range(step, max_seq_length, step), max_seq_length}))


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a window of {n} tokens is longer than the largest bucket ({buckets[-1]})")


def plan_chunks(
    lengths: Sequence[int], buckets: Sequence[int], batch_sizes: Sequence[int]
) -> list[tuple[int, list[int]]]:
    """(bucket, row indices) per call: rows sorted by length, grouped by bucket, split into batch sizes
    (largest that fits first, so no padding row is ever computed)."""
    sizes = sorted(set(batch_sizes), reverse=True)
    if 1 not in sizes:
        raise ValueError(f"batch_sizes must include 1, got {list(batch_sizes)}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_of(int(lengths[i]), buckets), []).append(i)
    chunks = []
    for bucket, rows in groups.items():
        while rows:
            size = next(s for s in sizes if s <= len(rows))
            chunks.append((bucket, rows[:size]))
            rows = rows[size:]
    return chunks


def length_batches(lengths: Sequence[int], max_batch: int, step: int = BUCKET_STEP) -> list[list[int]]:
    """Row indices per call for windows of these real lengths: sorted by length, grouped per `step` tokens,
    each group split into calls of at most `max_batch` rows. A call then pads each window by fewer than `step`
    positions, instead of every window of a request to its longest (batch 32 paid for its longest windows)."""
    if not lengths:
        return []
    buckets = default_buckets(max(int(n) for n in lengths), step)
    return [rows for _, rows in plan_chunks(lengths, buckets, range(1, max(int(max_batch), 1) + 1))]


def _inputs(n: int, batch: int = 1) -> dict[str, torch.Tensor]:
    """A warm-up window: only shapes matter (ids 1..7, in every vocabulary)."""
    # repeat, not expand: an expanded [1, n] tensor keeps stride 0 on the batch dimension, and Dynamo
    # guards on strides, so real windows (stride n) would miss every graph the warm-up built.
    ids = (torch.arange(int(n)) % 7 + 1).repeat(batch, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


class EagerEngine:
    """The PyTorch model, uncompiled, behind the engine interface (the reference every backend is checked against)."""

    name = "eager"

    def __init__(self, model: LengthAdaptiveForQuestionAnswering) -> None:
        self.model = model.eval()
        self.num_layers = model.num_layers

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        keep_ratios: Sequence[float] | torch.Tensor | None = None,
        length_config: Sequence[int] | None = None,
        keep_margins: Margins | None = None,
    ) -> QuestionAnsweringModelOutput:
        with torch.no_grad():
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                keep_ratios=keep_ratios,
                length_config=length_config,
                keep_margins=keep_margins,
            )

    def warmup(self, lengths: Sequence[int] = WARMUP_LENGTHS, **_: Any) -> dict[str, Any]:
        start = time.perf_counter()
        for n in lengths:
            self(**_inputs(n))
        return {"warmup_seconds": round(time.perf_counter() - start, 3), "graphs": 0}


def dynamo_graphs() -> int:
    """Graphs Dynamo has captured in this process (torch._dynamo counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class DynamicCompiledEngine(EagerEngine):
    """torch.compile(dynamic=True) over the whole length-adaptive forward.

    Every call goes through keep_ratios as a float64 [batch, layers] tensor (full length: None), and keep
    margins as a float32 one (inf: none at that layer), so the graphs depend on neither the window length nor
    the configuration. The model's token selection reads data-dependent counts (how many tokens a row keeps; a
    margin's count depends on the scores too), where Dynamo breaks the graph:
    the forward runs as a fixed handful of graphs per path (full length, token selection, margins) and batch
    kind (1, >= 2). `compiles_after_warmup` counts calls that still captured a new graph (should stay 0).
    """

    name = "compile-dynamic"

    def __init__(
        self,
        model: LengthAdaptiveForQuestionAnswering,
        *,
        backend: str | Callable = "inductor",
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        super().__init__(model)
        self.int8 = bool(quantized_units(model))
        # Freezing (weights as constants, prepacked) is what lets Inductor fuse the INT8 units'
        # quantize/dequantize pairs into oneDNN qlinear kernels; fp32 gains prepacked GEMMs from it too.
        self._freezing = backend == "inductor"
        self.max_graphs = max_graphs
        self._forward = torch.compile(model, dynamic=True, backend=backend)
        self.warmed = False
        self.compiles_after_warmup = 0

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        keep_ratios: Sequence[float] | torch.Tensor | None = None,
        length_config: Sequence[int] | None = None,
        keep_margins: Margins | None = None,
    ) -> QuestionAnsweringModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = own_tensor(input_ids), own_tensor(attention_mask)
        token_type_ids = None if token_type_ids is None else own_tensor(token_type_ids)
        ratios = None
        if keep_ratios is not None or length_config is not None:
            ratios = lengths.ratio_table(attention_mask, self.num_layers, keep_ratios, length_config)
        default = self.model.qala_config.keep_margins
        margins: Margins | None = margin_table(
            default if keep_margins is None else keep_margins, input_ids.size(0), self.num_layers, input_ids.device
        )
        if margins is None and default is not None:
            margins = [None] * self.num_layers  # the call's "no margin", not the config's (which None would mean)
        before = dynamo_graphs()
        with (
            compile_settings(self.max_graphs, self._freezing),
            # Without duck shaping, a window whose length happens to equal another size (hidden 384,
            # a head dimension, a kept count) does not get a graph of its own.
            torch.fx.experimental._config.patch(use_duck_shape=False),
        ):
            output = self._forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                keep_ratios=ratios,
                keep_margins=margins,
            )
        if self.warmed and dynamo_graphs() != before:
            self.compiles_after_warmup += 1
            logger.warning("a request of shape %s compiled a new graph after warm-up", tuple(input_ids.shape))
        return output

    def warmup(
        self,
        lengths: Sequence[int] = WARMUP_LENGTHS,
        batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES,
        keep_ratios: Sequence[Sequence[float]] | None = None,
        keep_margins: bool = False,
    ) -> dict[str, Any]:
        """Compile every graph serving needs, so that no request waits for a compile.

        The forward breaks its graph where it reads how many tokens to keep, and resumes in a graph that
        depends on whether layer i dropped tokens and whether an earlier layer already had (the
        Drop-and-Restore buffer exists or not), not on lengths or ratios. The default configurations
        visit each layer in both states: full length (None), every layer keeping all (all 1.0), every
        layer dropping (constant keep 0.8), only the first dropping ([0.8] * L), only the later half
        dropping. Lengths: symbolic shapes generalise on the second size seen, and Inductor's CPU code
        generation guards on size thresholds (seen: 12 * seq <= 4096), so short and 384-token windows are
        both visited. `keep_margins`: also each configuration with a margin at every layer, the path of any
        keep-margins call (the table's values do not matter; a model whose config has margins visits it anyway).
        `compiles_after_warmup` then counts requests that still compiled.
        """
        layers = self.num_layers
        configs = (
            [list(c) for c in keep_ratios]
            if keep_ratios is not None
            else [
                [1.0] * layers,
                constant_keep_ratios(WARMUP_KEEP, layers),
                [WARMUP_KEEP] * layers,
                [1.0] * (layers // 2) + [WARMUP_KEEP] * (layers - layers // 2),
            ]
        )
        for config in configs:
            check_keep_ratios(config, num_layers=layers)
        # None: the config's margins if it has some (the margin path), else none; [None] * L: none at all.
        has_default = self.model.qala_config.keep_margins is not None
        margin_calls: list[list[float | None] | None] = [None]
        if has_default:
            margin_calls.append([None] * layers)
        elif keep_margins:
            margin_calls.append([WARMUP_MARGIN] * layers)
        start, graphs = time.perf_counter(), dynamo_graphs()
        for batch in batch_sizes:
            for n in lengths:
                for ratios in (None, *configs):
                    for margins in margin_calls:
                        self(**_inputs(n, batch), keep_ratios=ratios, keep_margins=margins)
        self.warmed = True
        seconds = time.perf_counter() - start
        logger.info("compile-dynamic warm-up: %d new graphs in %.1f s", dynamo_graphs() - graphs, seconds)
        return {"warmup_seconds": round(seconds, 3), "graphs": dynamo_graphs() - graphs}


def _onnx_engine(model: LengthAdaptiveForQuestionAnswering, *, int8: bool, **options: Any) -> Any:
    from qala.quantize.onnx import OnnxEngine

    return OnnxEngine(_fp32_model(model), int8=int8, **options)


def _openvino_engine(model: LengthAdaptiveForQuestionAnswering, *, int8: bool, **options: Any) -> Any:
    from qala.quantize.openvino import OpenVinoEngine

    return OpenVinoEngine(_fp32_model(model), int8=int8, **options)


def _inc_engine(model: LengthAdaptiveForQuestionAnswering | Path, *, openvino: bool = False, **options: Any) -> Any:
    from qala.quantize.qdq import IncOpenVinoEngine, IncQdqEngine

    return (IncOpenVinoEngine if openvino else IncQdqEngine)(model, **options)


def _fp32_model(model: LengthAdaptiveForQuestionAnswering) -> LengthAdaptiveForQuestionAnswering:
    """The fp32 model to export to ONNX: the model itself, or the fp32 source weights of an INT8 artifact."""
    if not quantized_units(model):
        return model
    from qala.quantize.artifact import fp32_state_dict

    fp32 = LengthAdaptiveForQuestionAnswering.from_config(model.config, model.qala_config)
    fp32.load_state_dict(fp32_state_dict(model))
    return fp32.eval()


BACKENDS: dict[str, Callable[..., Any]] = {
    "eager": lambda model, **kw: EagerEngine(model, **kw),
    "compile-dynamic": lambda model, **kw: DynamicCompiledEngine(model, **kw),
    "onnxruntime": lambda model, **kw: _onnx_engine(model, int8=False, **kw),
    "onnxruntime-int8": lambda model, **kw: _onnx_engine(model, int8=True, **kw),
    "onnxruntime-inc": lambda model, **kw: _inc_engine(model, **kw),
    "openvino": lambda model, **kw: _openvino_engine(model, int8=False, **kw),
    "openvino-int8": lambda model, **kw: _openvino_engine(model, int8=True, **kw),
    "openvino-bf16": lambda model, **kw: _openvino_engine(model, int8=False, precision="bf16", **kw),
    "openvino-inc": lambda model, **kw: _inc_engine(model, openvino=True, **kw),
}


def make_engine(model_or_dir: nn.Module | str | Path, backend: str = "compile-dynamic", **options: Any) -> Any:
    """An engine over a model (or a qala model directory, fp32 or INT8 artifact), by backend name.

    Options go to the backend: compile-dynamic takes `backend` (torch.compile's) and `max_graphs`;
    onnxruntime* take `workdir` (exported files go to workdir/<model content hash>/; default a temporary
    folder), `threads` and `fused`; openvino* take `workdir`, `threads`, `buckets`, `batch_sizes`,
    `max_seq_length`, `precision` ("f32"; "bf16" is the "openvino-bf16" backend) and (INT8) `calibration`,
    a list of windows {input_ids, attention_mask, token_type_ids}.
    The ONNX and OpenVINO backends export the fp32 weights (an INT8 artifact's fp32 source) and quantize
    on their own, except onnxruntime-inc / openvino-inc (an INT8 artifact only, INC's own quantization;
    onnxruntime-inc takes `workdir` and `threads`, openvino-inc the openvino options, no calibration): given
    a directory, both serve its QDQ graphs from workdir/inc-<hash of its content>/ (built there once).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose one of {sorted(BACKENDS)}")
    if isinstance(model_or_dir, str | Path) and backend in ("onnxruntime-inc", "openvino-inc"):
        # Serve QDQ graphs cached by the artifact's content: the artifact is rebuilt (PT2E replayed, ~6 s of a
        # cold start) only to export a graph the cache lacks (qala.quantize.qdq.QdqCache, cached_qdq).
        return _inc_engine(Path(model_or_dir), openvino=backend == "openvino-inc", **options)
    if isinstance(model_or_dir, str | Path):
        from qala.quantize.load import load_model

        model = load_model(model_or_dir)
    else:
        model = model_or_dir
    return BACKENDS[backend](model.eval(), **options)


def warm_for_serving(
    engine: Any, *, lengths: Sequence[int], max_batch: int, configs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Build everything `engine` needs to answer windows of any length up to max(lengths), in calls of up to
    `max_batch` windows, at `configs` (model keyword arguments: {}, {"keep_ratios": ...}, {"length_config": ...},
    each maybe with "keep_margins"), so that no request waits for a compile. compile-dynamic: its generic
    configurations at batch 1 and 2 (Dynamo specialises size 1; sizes >= 2 share graphs), the margin path too if
    a configuration has margins; openvino*: every bucket x batch size x configuration; the others: one call per
    length (allocator arenas)."""
    name = getattr(engine, "name", "")
    if name.startswith("openvino"):
        for config in configs:
            engine.check_margins(config.get("keep_margins"))
        absolute = [list(c["length_config"]) for c in configs if c.get("length_config") is not None]
        ratios = [c.get("keep_ratios") for c in configs if c.get("length_config") is None]
        return engine.warmup(batch_sizes=[max_batch], keep_ratios=ratios, length_configs=absolute)
    if name == "compile-dynamic":
        margins = any(c.get("keep_margins") is not None for c in configs)
        return engine.warmup(lengths=lengths, batch_sizes=(1, 2) if max_batch > 1 else (1,), keep_margins=margins)
    if name.startswith("onnxruntime"):
        # Each configuration's graph (one per count of leading full layers) is exported and loaded now.
        for config in configs:
            engine(**_inputs(16), **config)
    return engine.warmup(lengths=lengths)
