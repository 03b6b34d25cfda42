"""Post-training INT8 (static or dynamic) through Intel Neural Compressor 3.x's PT2E path, one unit at a time.

INC's `prepare` / `convert` use torchao's X86InductorQuantizer (torch >= 2.11), so the converted
units hold quantize/dequantize pairs that Inductor fuses into oneDNN int8 kernels under
`torch.compile` (see qala.quantize.compile).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qala.quantize.embedding import quantize_embeddings_, word_embeddings
from qala.quantize.units import (
    QuantizedUnit,
    capture_unit_inputs,
    dynamic_shapes,
    model_inputs,
    reduce_activation_range,
    resolve_reduce_range,
    select_units,
    swap_unit,
)
from qala.quantize.weight_only import restore_modules, weight_only_int8_

if TYPE_CHECKING:
    from neural_compressor.torch.quantization import DynamicQuantConfig
    from neural_compressor.torch.quantization.config import INT8StaticQuantConfig

    QuantConfig = INT8StaticQuantConfig | DynamicQuantConfig

logger = logging.getLogger(__name__)


def approach_of(quant_config: Any) -> str:
    """'static' or 'dynamic' for an INC config object; a TypeError naming what is accepted otherwise."""
    from neural_compressor.torch.quantization import DynamicQuantConfig
    from neural_compressor.torch.quantization.config import INT8StaticQuantConfig

    if isinstance(quant_config, INT8StaticQuantConfig):
        approach = "static"
    elif isinstance(quant_config, DynamicQuantConfig):
        approach = "dynamic"
    else:
        raise TypeError(
            "quant_config must be an Intel Neural Compressor StaticQuantConfig (INT8) or DynamicQuantConfig, "
            f"got {type(quant_config).__name__}; for QAT use qala.quantize.prepare_qat_ / convert_qat_"
        )
    tunable = {k: v for k, v in quant_config.to_dict().items() if isinstance(v, list) and k.startswith(("w_", "act_"))}
    if tunable:
        raise ValueError(
            f"quant_config holds lists {tunable}, which INC expands into tuning trials; "
            "pass one configuration here (tune with INC's autotune around quantize_)"
        )
    return approach


def config_from_dict(approach: str, config: Mapping[str, Any]) -> Any:
    """The INC config object a saved config dict came from; only the two INT8 config classes are allowed."""
    from neural_compressor.torch.quantization import DynamicQuantConfig
    from neural_compressor.torch.quantization.config import INT8StaticQuantConfig

    classes = {"static": INT8StaticQuantConfig, "dynamic": DynamicQuantConfig}
    return classes[approach].from_dict(dict(config))


def prepare_unit(
    name: str,
    module: nn.Module,
    example_args: tuple[torch.Tensor, ...],
    approach: str,
    quant_config: QuantConfig,
    reduce_range: bool,
) -> QuantizedUnit:
    """Export one unit with dynamic batch/sequence dims and insert INC's observers."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import prepare

    source_keys = list(module.state_dict())
    # INC's export (rather than torch.export directly) sets the attributes its prepare checks.
    exported = export(module, example_args, dynamic_shapes=dynamic_shapes(name))
    # A copy per unit: INC keeps the config on the prepared graph and may annotate it.
    prepared = prepare(exported, copy.deepcopy(quant_config))
    if reduce_range:
        reduce_activation_range(prepared)
    return QuantizedUnit(
        name,
        prepared,
        approach=approach,
        quant_config=quant_config.to_dict(),
        source_keys=source_keys,
        example_shape=example_args[0].shape[:2],
        reduce_range=reduce_range,
    )


def convert_unit(unit: QuantizedUnit) -> None:
    from neural_compressor.torch.quantization import convert

    unit.snapshot()
    unit.set_converted(convert(unit.graph_module))


def quantize_(
    model: nn.Module,
    quant_config: QuantConfig,
    calibration: Iterable[Mapping[str, Any]],
    *,
    fp32_units: Sequence[str] = (),
    reduce_range: bool | None = None,
    int8_embeddings: bool = False,
    fp32_unit_weights: str = "fp32",
) -> nn.Module:
    """Quantize `model`'s units to INT8 in place with an INC StaticQuantConfig or DynamicQuantConfig.

    `calibration` yields dicts of model inputs (input_ids, attention_mask, token_type_ids) with an
    optional "length_config" (list of kept lengths, or None for the model's own): every batch runs the
    whole length-adaptive forward, so one set of observers sees every length configuration it is
    given. The first batch also provides the export examples. Dynamic quantization reads only the
    first batch (one forward fills the weight observers: without it the outputs are silently wrong).
    Units whose names match a pattern in `fp32_units` (e.g. "qa_outputs", "encoder.layer.0.*") stay
    fp32. `reduce_range` quantizes activations to 7 bits, which CPUs without VNNI need for correct
    compiled int8 kernels; None decides by this CPU (record it: the artifact does). `int8_embeddings`
    first stores the word-embedding table int8 per row (qala.quantize.embedding), so that calibration
    sees the embeddings the deployed model computes. `fp32_unit_weights="int8"` stores the Linear
    weights of the fp32 units int8 per channel while their activations stay fp32 (weight-only,
    qala.quantize.weight_only), before calibration for the same reason. The model is left in eval
    mode; on failure its original units (and embeddings) are put back.
    """
    approach = approach_of(quant_config)
    reduce_range = resolve_reduce_range(reduce_range)
    if approach == "dynamic" and quant_config.w_granularity != "per_channel":
        # Seen with torch 2.13: the compiled graph then runs fp32 GEMMs around fake q/dq (no speed-up).
        logger.warning(
            "DynamicQuantConfig(w_granularity=%r): Inductor has no int8 kernel for dynamic activations with "
            "per-tensor weights; use w_granularity='per_channel' for a compiled int8 model",
            quant_config.w_granularity,
        )
    if fp32_unit_weights not in ("fp32", "int8"):
        raise ValueError(f"fp32_unit_weights must be 'fp32' or 'int8', got {fp32_unit_weights!r}")
    selected, keep = select_units(model, fp32_units)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration yielded no batch; quantize_ needs at least one")
    embeddings = word_embeddings(model)
    if int8_embeddings:
        quantize_embeddings_(model)
    weight_only = weight_only_int8_(model, keep) if fp32_unit_weights == "int8" else {}
    try:
        example_args, example_shape = capture_unit_inputs(model, list(selected), first)
    except BaseException:
        model.backbone.embeddings.word_embeddings = embeddings
        restore_modules(model, weight_only)
        raise
    logger.info(
        "INT8 %s: exporting and preparing %d units (fp32: %s), example shape %s, reduce_range=%s",
        approach,
        len(selected),
        keep or "none",
        example_shape,
        reduce_range,
    )

    model.eval()
    originals: dict[str, nn.Module] = {}
    try:
        units = {}
        for name, module in selected.items():
            units[name] = prepare_unit(name, module, example_args[name], approach, quant_config, reduce_range)
            originals[name] = swap_unit(model, name, units[name])
        calibrate(model, [first] if approach == "dynamic" else _chain(first, batches))
        for unit in units.values():
            convert_unit(unit)
    except BaseException:
        for name, original in originals.items():
            swap_unit(model, name, original)
        model.backbone.embeddings.word_embeddings = embeddings
        restore_modules(model, weight_only)
        raise
    return model


def _chain(first: Mapping[str, Any], rest: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    yield first
    yield from rest


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> int:
    """Run the whole model over `batches` (each with its own length configuration); return how many ran."""
    count, configs = 0, set()
    for batch in batches:
        inputs, length_config = model_inputs(batch)
        model(**inputs, length_config=length_config)
        count += 1
        configs.add(None if length_config is None else tuple(int(n) for n in length_config))
    logger.info("calibrated on %d batches, %d distinct length configurations", count, len(configs))
    return count
