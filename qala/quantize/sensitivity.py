"""Per-unit sensitivity: which quantized units cost the accuracy.

Quantize every unit once (one calibration), then score the model with one unit INT8 and the rest
fp32 (`mode="only"`: what each unit loses on its own), or with every unit INT8 but one
(`mode="all_but"`: what keeping that unit in fp32 would win back). Observers of a prepared unit only
watch, so during the shared calibration each unit sees the fp32 activations it would see if it were
the only one quantized: one calibration serves every single-unit model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from torch import nn

from qala.quantize.pt2e import quantize_
from qala.quantize.units import get_unit, quantized_units, swap_unit

logger = logging.getLogger(__name__)


def unit_sensitivity(
    model: nn.Module,
    quant_config: Any,
    calibration: Iterable[Mapping[str, Any]],
    score_fn: Callable[[nn.Module], float],
    *,
    units: Sequence[str] | None = None,
    mode: Literal["only", "all_but"] = "only",
    reduce_range: bool | None = None,
    quantized: nn.Module | None = None,
) -> dict[str, float]:
    """One score per unit: `score_fn` of the model with only that unit INT8 (or all but that unit).

    `quant_config` is an INC StaticQuantConfig / DynamicQuantConfig as for `quantize_`; `model` (fp32)
    is not modified. `units` restricts the analysis (default: every unit, in execution order).
    `quantized`, a model already quantized from `model` with the same config, skips quantizing again
    (run both modes from one calibration). Scores come back in unit order.
    """
    if mode not in ("only", "all_but"):
        raise ValueError(f"mode must be 'only' or 'all_but', got {mode!r}")
    if quantized is None:
        quantized = quantize_(copy.deepcopy(model), quant_config, calibration, reduce_range=reduce_range)
    int8_units = quantized_units(quantized)
    names = list(int8_units) if units is None else list(units)
    missing = [name for name in names if name not in int8_units]
    if missing:
        raise ValueError(f"units {missing} are not quantized in the model; quantized units: {list(int8_units)}")
    # One working copy; each unit is swapped in (or out) and back, so no per-unit deep copy is needed.
    work = copy.deepcopy(model).eval() if mode == "only" else quantized
    scores: dict[str, float] = {}
    for name in names:
        replacement = int8_units[name] if mode == "only" else get_unit(model, name)
        previous = swap_unit(work, name, replacement)
        try:
            scores[name] = float(score_fn(work))
        finally:
            swap_unit(work, name, previous)
        logger.info("sensitivity (%s) %s: %.4f", mode, name, scores[name])
    return scores
