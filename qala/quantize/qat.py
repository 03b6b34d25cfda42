"""INT8 quantization-aware training with torchao's PT2E QAT, one unit at a time.

INC 3.10 has no INT8 QAT (its prepare_qat is MX-format only). torchao's `prepare_qat_pt2e` with the
X86InductorQuantizer is the same quantizer INC's static path uses, so QAT and post-training models
convert to the same kind of graph and deploy alike.

Units are exported in train mode, so their dropout is in the graph; the QuantizedUnit wrapper
rewrites it on `model.train()` / `model.eval()`. The fake-quant graphs share their parameters with
the modules they replace: an optimizer built before or after `prepare_qat_` trains them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qala.quantize.embedding import quantize_embeddings_
from qala.quantize.units import (
    PREPARED,
    QuantizedUnit,
    capture_unit_inputs,
    dynamic_shapes,
    quantized_units,
    resolve_reduce_range,
    select_units,
    swap_unit,
)

logger = logging.getLogger(__name__)

# What the artifact records as the QAT "config": torchao's default X86 Inductor QAT recipe
# (per-channel symmetric int8 weights, per-tensor affine uint8 activations, moving-average observers).
QAT_CONFIG: dict[str, Any] = {"quantizer": "X86InductorQuantizer", "is_qat": True}


def _quantizer(reduce_range: bool):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=reduce_range)
    return X86InductorQuantizer().set_global(config)


def prepare_unit(
    name: str, module: nn.Module, example_args: tuple[torch.Tensor, ...], reduce_range: bool
) -> QuantizedUnit:
    """Export one unit in train mode (dropout kept) and insert fake-quantizers."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    source_keys = list(module.state_dict())
    was_training = module.training
    module.train()
    try:
        # Non-strict: the QAT graph must keep autograd-friendly train-mode ops; INC's export forces eval.
        exported = torch.export.export(module, example_args, dynamic_shapes=dynamic_shapes(name), strict=False)
    finally:
        module.train(was_training)
    prepared = prepare_qat_pt2e(exported.module(), _quantizer(reduce_range))
    return QuantizedUnit(
        name,
        prepared,
        approach="qat",
        quant_config=dict(QAT_CONFIG),
        source_keys=source_keys,
        example_shape=example_args[0].shape[:2],
        reduce_range=reduce_range,
    )


def convert_unit(unit: QuantizedUnit) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    unit.train(False)  # dropout out of the graph before it is frozen into the INT8 one
    unit.snapshot()
    # fold_quantize=False keeps the fp32 weight + q/dq pairs, like INC's convert: Inductor's freezing
    # folds them at compile time, and the reload path rebuilds the same graph.
    unit.set_converted(convert_pt2e(unit.graph_module, fold_quantize=False))


def prepare_qat_(
    model: nn.Module,
    example_batch: Mapping[str, Any],
    *,
    fp32_units: Sequence[str] = (),
    reduce_range: bool | None = None,
    int8_embeddings: bool = False,
) -> nn.Module:
    """Swap fake-quant (QAT) units into `model` in place; the model stays trainable, in its current mode.

    `example_batch` (a dict of model inputs) only provides export examples. Train as usual (any
    length configuration per call: the units have dynamic batch/sequence dims), then `convert_qat_`.
    `fp32_units`, `reduce_range` and `int8_embeddings` are as in `quantize_` (the int8 table is then
    frozen: training goes on around it).
    """
    reduce_range = resolve_reduce_range(reduce_range)
    selected, keep = select_units(model, fp32_units)
    if int8_embeddings:
        quantize_embeddings_(model)
    example_args, example_shape = capture_unit_inputs(model, list(selected), example_batch)
    logger.info("QAT: preparing %d units (fp32: %s), example shape %s", len(selected), keep or "none", example_shape)
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in selected.items():
            originals[name] = swap_unit(model, name, prepare_unit(name, module, example_args[name], reduce_range))
    except BaseException:
        for name, original in originals.items():
            swap_unit(model, name, original)
        raise
    model.train(model.training)  # the new units follow the model's current mode
    return model


def convert_qat_(model: nn.Module) -> nn.Module:
    """Convert every fake-quant unit of `model` to INT8 in place; the model is left in eval mode."""
    units = {name: u for name, u in quantized_units(model).items() if u.approach == "qat" and u.stage == PREPARED}
    if not units:
        raise ValueError("the model has no QAT units to convert; call prepare_qat_ first")
    model.eval()
    for unit in units.values():
        convert_unit(unit)
    logger.info("QAT: converted %d units to INT8", len(units))
    return model
