"""How many tokens each layer keeps: qala's one length representation, and the one edge converter.

Inside qala a length configuration is `keep_ratios`: per layer, the share of each window's REAL token
count that survives that layer (cumulative: ratio i is of the real length, not of layer i-1's
survivors), non-increasing, in (0, 1]. A window of n real tokens keeps ceil(r_i * n) after layer i, so
the same configuration means the same thing for a 60-token and a 384-token window and padding never
takes a slot. A forward runs a [batch, layers] table of them (one row per window: LengthDrop gives each
window its own).

The Length-Adaptive Transformer paper, its reference code and ITREX write a configuration as ABSOLUTE
kept positions of a window padded to 384 (`length_config`, e.g. [384, 320, 256, ...]). qala takes that
form only at the edge (a recipe's paper-mode keys, `qala.evaluate --length-config`, the padded
benchmark table, LAT's absolute LengthDrop); `resolve` turns it into per-row keep ratios that keep
exactly min(k_i, n_b) real tokens, plus the static slot widths a compiled padded graph traces with.
Nothing after `resolve` branches on the unit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# --------------------------------------------------------------------------- keep ratios (qala's unit)


def check_keep_ratios(keep_ratios: Sequence[float], *, num_layers: int | None = None) -> None:
    """Raise ValueError unless `keep_ratios` is a usable per-layer list of kept shares of the real length."""
    ratios = list(keep_ratios)
    if num_layers is not None and len(ratios) != num_layers:
        raise ValueError(f"keep_ratios has {len(ratios)} entries, the model has {num_layers} layers: {ratios}")
    bad = [r for r in ratios if not (isinstance(r, int | float) and 0.0 < r <= 1.0)]
    if bad:
        raise ValueError(f"keep_ratios entries must be in (0, 1], got {bad[0]!r} in {ratios}")
    if any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
        raise ValueError(f"keep_ratios must be non-increasing from layer to layer: {ratios}")


def parse_keep_ratios(text: str, *, num_layers: int | None = None) -> list[float]:
    """'0.9,0.8,0.7,0.6,0.5,0.4' -> per-layer ratios; 'keep=0.8' (or a single number) -> that
    constant per-layer keep, compounded (0.8, 0.64, ...), as LAT's length_drop_ratio."""
    text = text.strip()
    try:
        if text.startswith("keep=") or ("," not in text and num_layers is not None):
            single = float(text.removeprefix("keep="))
            if num_layers is None:
                raise ValueError("a constant keep ratio needs the number of layers")
            if not 0.0 < single <= 1.0:
                raise ValueError(f"keep ratio must be in (0, 1], got {single}")
            ratios = constant_keep_ratios(single, num_layers)
        else:
            ratios = [float(r) for r in text.split(",")]
    except ValueError as e:
        raise ValueError(f"keep ratios {text!r}: {e}") from None
    check_keep_ratios(ratios, num_layers=num_layers)
    return ratios


def constant_keep_ratios(keep_ratio: float, num_layers: int) -> list[float]:
    """Each layer keeps `keep_ratio` of what the previous one kept, as shares of the real length."""
    return [round(keep_ratio ** (i + 1), 6) for i in range(num_layers)]


def kept_per_layer(keep_ratios: Sequence[float], num_tokens: int) -> list[int]:
    """Tokens a window of `num_tokens` real tokens keeps after each layer: ceil(r * n), at least 1."""
    # The epsilon absorbs float noise (0.7 * 10 = 7.000000000000001 must keep 7, not 8).
    return [min(num_tokens, max(1, math.ceil(r * num_tokens - 1e-6))) for r in keep_ratios]


def keep_counts(ratios: torch.Tensor, real_lengths: torch.Tensor) -> torch.Tensor:
    """kept_per_layer on tensors: ceil(r_b * n_b), at least 1 (ratios float64: 0.7 * 10 keeps 7)."""
    return torch.ceil(ratios * real_lengths - 1e-6).long().clamp(min=1)


def layer_bounds(num_layers: int, ratio_bound: float | Sequence[float]) -> list[float]:
    """One LengthDrop bound per layer: `ratio_bound` repeated, or the per-layer list checked for length."""
    bounds = [ratio_bound] * num_layers if isinstance(ratio_bound, (int, float)) else list(ratio_bound)
    if len(bounds) != num_layers:
        raise ValueError(f"{len(bounds)} LengthDrop bounds for a model of {num_layers} layers")
    return bounds


def sample_keep_ratios(num_layers: int, ratio_bound: float | Sequence[float], rng: random.Random) -> list[float]:
    """LengthDrop: each layer keeps a uniform share in [1 - bound, 1] of the previous one's
    (`ratio_bound`: one bound for every layer, or one per layer)."""
    ratios, ratio = [], 1.0
    for bound in layer_bounds(num_layers, ratio_bound):
        ratio *= rng.uniform(1 - bound, 1.0)
        ratios.append(ratio)
    return ratios


def smallest_keep_ratios(num_layers: int, ratio_bound: float | Sequence[float]) -> list[float]:
    """The sandwich's smallest sub-model: every layer at its bound."""
    bounds = layer_bounds(num_layers, ratio_bound)
    return [round(math.prod(1 - b for b in bounds[: i + 1]), 6) for i in range(num_layers)]


# --------------------------------------------------------------------------- the paper's absolute form (edge only)


def check_length_config(
    length_config: Sequence[int], *, num_layers: int | None = None, max_seq_length: int | None = None
) -> None:
    """Raise ValueError unless `length_config` is a usable per-layer list of kept lengths."""
    if num_layers is not None and len(length_config) != num_layers:
        raise ValueError(f"length_config has {len(length_config)} entries, the model has {num_layers} layers")
    if any(n < 1 for n in length_config):
        raise ValueError(f"length_config entries must be >= 1 (the [CLS] token is always kept): {list(length_config)}")
    if any(b > a for a, b in zip(length_config, length_config[1:], strict=False)):
        raise ValueError(f"length_config must be non-increasing from layer to layer: {list(length_config)}")
    if max_seq_length is not None and length_config and length_config[0] > max_seq_length:
        raise ValueError(f"length_config {list(length_config)} keeps more than max_seq_length={max_seq_length}")


def constant_ratio_length_config(keep_ratio: float, num_layers: int, seq_length: int) -> list[int]:
    """Each layer keeps `keep_ratio` of the tokens the previous layer kept (LAT's length_drop_ratio)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    lengths, length = [], seq_length
    for _ in range(num_layers):
        length = max(1, math.ceil(length * keep_ratio))
        lengths.append(length)
    return lengths


def sample_length_config(
    seq_length: int, num_layers: int, ratio_bound: float, rng: random.Random, min_length: int = 2
) -> list[int]:
    """LAT's LengthDrop: each layer keeps a uniform draw from [ceil(prev * (1 - bound)), prev] positions."""
    lengths, length = [], seq_length
    for _ in range(num_layers):
        length = max(min_length, rng.randint(math.ceil(length * (1 - ratio_bound)), length))
        lengths.append(length)
    return lengths


def smallest_length_config(seq_length: int, num_layers: int, ratio_bound: float, min_length: int = 2) -> list[int]:
    """LAT's sandwich rule's smallest sub-model: every layer at the bound."""
    return [max(min_length, n) for n in constant_ratio_length_config(1 - ratio_bound, num_layers, seq_length)]


def constant_config(keep_ratio: float, num_layers: int, padded_length: int | None = None) -> dict[str, list]:
    """A constant per-layer keep (LAT's length_drop_ratio: each layer keeps `keep_ratio` of what the previous
    one kept) as forward keyword arguments: keep ratios of the real length, or with `padded_length` the
    paper's absolute configuration of a window padded to it."""
    if padded_length is not None:
        return {"length_config": constant_ratio_length_config(keep_ratio, num_layers, padded_length)}
    return {"keep_ratios": constant_keep_ratios(keep_ratio, num_layers)}


def constant_name(keep_ratio: float, padded: bool = False) -> str:
    """constant_config's name in reports: "keep_0.8" in qala's units, "padded_keep_0.8" in the paper's padded
    form (the same name never means both: train's eval.json, tune's report.json)."""
    return f"{'padded_' if padded else ''}keep_{keep_ratio:g}"


def sandwich(
    num_layers: int,
    ratio_bound: float | Sequence[float],
    num_sandwich: int,
    rng: random.Random,
    *,
    batch_size: int,
    padded_length: int | None = None,
    margin_draws: int = 0,
    margin_range: Sequence[float] = (),
) -> list[dict[str, Any]]:
    """LengthDrop's sub-models for one batch (the full model is the caller's): the smallest, then
    `num_sandwich` random draws, each as forward keyword arguments.

    `margin_draws` of the random draws give each row a logit margin uniform in `margin_range` instead of
    keep ratios (qala.model LengthAdaptiveConfig.keep_margins), at every layer whose bound lets it drop: the
    model then trains under the threshold rule it may serve with, a window keeping as many tokens as its
    scores say.

    In qala's units every row draws its own keep ratios (rows differ in real length). With `padded_length`
    (LAT's absolute LengthDrop on windows padded to it, paper reproductions) one absolute configuration per
    sub-model, as the LAT reference code draws them; that form takes one bound for every layer.
    """
    if padded_length is not None:
        if not isinstance(ratio_bound, (int, float)):
            raise ValueError("absolute LengthDrop takes one bound for every layer, not per-layer bounds")
        configs = [smallest_length_config(padded_length, num_layers, ratio_bound)]
        configs += [sample_length_config(padded_length, num_layers, ratio_bound, rng) for _ in range(num_sandwich)]
        return [{"length_config": c} for c in configs]
    draws: list[dict[str, Any]] = [
        {"keep_ratios": torch.tensor([sample_keep_ratios(num_layers, ratio_bound, rng) for _ in range(batch_size)])}
        for _ in range(num_sandwich - margin_draws)
    ]
    drops = [b > 0 for b in layer_bounds(num_layers, ratio_bound)]
    for _ in range(margin_draws):
        row_margins = [rng.uniform(*margin_range) for _ in range(batch_size)]
        table = [[m if drop else math.inf for drop in drops] for m in row_margins]
        draws.append({"keep_margins": torch.tensor(table, dtype=torch.float32)})
    return [{"keep_ratios": smallest_keep_ratios(num_layers, ratio_bound)}] + draws


# --------------------------------------------------------------------------- what a call runs


def own_tensor(x: torch.Tensor) -> torch.Tensor:
    """`x` contiguous and not a view: Dynamo guards on a view's base (its sizes too), so a slice of a larger
    tensor would miss the graphs that fresh tensors of the same shape built (the compile-dynamic engine)."""
    return x if x._base is None and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class Lengths:
    """What a forward call keeps, resolved against its batch.

    `ratios`: float64 [batch, layers] keep ratios of each row's real length, or None (full length: no
    layer selects). `widths`: static top-k slot counts per layer, or None (each layer's width is the most
    any row keeps, read from the data). Only the paper's absolute form has static widths: a compiled
    padded graph traces them as Python ints (one graph), where a data-dependent width would break it.
    """

    ratios: torch.Tensor | None
    widths: tuple[int, ...] | None = None


def resolve(
    attention_mask: torch.Tensor,
    num_layers: int,
    keep_ratios: Sequence[float] | torch.Tensor | None = None,
    length_config: Sequence[int] | None = None,
) -> Lengths:
    """The one converter from what a caller passes to what the forward runs.

    keep_ratios: a list for the whole batch or a [batch, layers] tensor (one configuration per row).
    length_config (the paper's absolute form): row b of n_b real tokens gets ratio (min(k_i, n_b) - 0.5) / n_b,
    whose ceil(r * n_b) is exactly min(k_i, n_b), the real tokens LAT's absolute mode keeps (padding is
    ranked last there, so its k_i slots take real tokens first); its widths are k_i. Neither: full length.
    """
    if keep_ratios is not None and length_config is not None:
        raise ValueError("pass length_config or keep_ratios, not both")
    batch = attention_mask.size(0)
    if length_config is not None:
        values = [int(k) for k in length_config]
        check_length_config(values, num_layers=num_layers)
        n = attention_mask.sum(dim=1).to(torch.float64).clamp(min=1)[:, None]
        k = torch.tensor([float(v) for v in values], dtype=torch.float64, device=n.device)[None, :]
        return Lengths(((torch.minimum(k, n) - 0.5) / n).contiguous(), tuple(values))
    if keep_ratios is None:
        return Lengths(None)
    if isinstance(keep_ratios, torch.Tensor) and keep_ratios.dim() == 2:
        if tuple(keep_ratios.shape) != (batch, num_layers):
            raise ValueError(f"keep_ratios tensor must be [{batch}, {num_layers}], got {list(keep_ratios.shape)}")
        return Lengths(own_tensor(keep_ratios.to(device=attention_mask.device, dtype=torch.float64)))
    ratios = [float(r) for r in keep_ratios]
    check_keep_ratios(ratios, num_layers=num_layers)
    # float64: ceil(r * n) must not flip on float32 rounding (0.7 * 10). A fresh tensor, not an expanded
    # view: Dynamo guards on a view's base, so views and fresh tables would compile graphs of their own.
    return Lengths(torch.tensor([ratios] * batch, dtype=torch.float64, device=attention_mask.device))


def ratio_table(
    attention_mask: torch.Tensor,
    num_layers: int,
    keep_ratios: Sequence[float] | torch.Tensor | None = None,
    length_config: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-row keep ratios, float64 [batch, layers], for any call (all 1.0 at full length)."""
    ratios = resolve(attention_mask, num_layers, keep_ratios, length_config).ratios
    return ratios if ratios is not None else torch.ones(attention_mask.size(0), num_layers, dtype=torch.float64)


def kept_table(
    attention_mask: torch.Tensor,
    num_layers: int,
    keep_ratios: Sequence[float] | torch.Tensor | None = None,
    length_config: Sequence[int] | None = None,
) -> torch.Tensor:
    """Tokens each row keeps after each layer, int64 [batch, layers], as the PyTorch forward counts them
    (an exported graph still caps each count at the tokens a row has left)."""
    table = ratio_table(attention_mask, num_layers, keep_ratios, length_config)
    real = attention_mask.sum(dim=1).to(torch.float64)[:, None]
    return keep_counts(table, real).contiguous()


def config_key(
    num_layers: int,
    keep_ratios: Sequence[float] | torch.Tensor | None = None,
    length_config: Sequence[int] | None = None,
    max_seq_length: int | None = None,
) -> tuple[str, tuple[float, ...]] | None:
    """The configuration a call asks for, hashable (graph caches): None (full length), ("ratio", ratios)
    or ("absolute", k). An absolute configuration that keeps every position of max_seq_length is full
    length. A per-row [batch, layers] ratio tensor has no single key: the caller decides (kept_table)."""
    if keep_ratios is not None and length_config is not None:
        raise ValueError("pass length_config or keep_ratios, not both")
    if length_config is not None:
        values = [int(k) for k in length_config]
        check_length_config(values, num_layers=num_layers)
        if max_seq_length is not None and min(values) >= max_seq_length:
            return None
        return ("absolute", tuple(float(k) for k in values))
    if keep_ratios is None:
        return None
    ratios = [float(r) for r in keep_ratios]
    check_keep_ratios(ratios, num_layers=num_layers)
    return None if min(ratios) >= 1.0 else ("ratio", tuple(ratios))


def key_kwargs(key: tuple[str, tuple[float, ...]] | None) -> dict[str, list]:
    """config_key's inverse: the keyword arguments (keep_ratios= or length_config=) of a call with that key."""
    if key is None:
        return {}
    mode, values = key
    return {"keep_ratios": list(values)} if mode == "ratio" else {"length_config": [int(v) for v in values]}


def config_json(
    keep_ratios: Sequence[float] | None = None, length_config: Sequence[int] | None = None
) -> dict[str, list | None]:
    """A configuration as a call's keyword arguments and as JSON: both keys, the unset one None."""
    return {
        "keep_ratios": None if keep_ratios is None else [float(r) for r in keep_ratios],
        "length_config": None if length_config is None else [int(n) for n in length_config],
    }


def config_kwargs(
    keep_ratios: Sequence[float] | None = None, length_config: Sequence[int] | None = None
) -> dict[str, list]:
    """config_json without the unset key ({} at full length): what a forward or an engine is called with."""
    return {k: v for k, v in config_json(keep_ratios, length_config).items() if v is not None}


def config_label(keep_ratios: Sequence[float] | None = None, length_config: Sequence[int] | None = None) -> str:
    """A configuration's readable name (Prometheus labels, logs): "keep_ratios=1,0.75", "length_config=384,256",
    "full"."""
    named = config_kwargs(keep_ratios, length_config)
    return next((f"{k}=" + ",".join(f"{v:g}" for v in values) for k, values in named.items()), "full")
