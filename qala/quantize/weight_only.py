"""Weight-only INT8 for the units kept in fp32: int8 weights on disk and in memory, fp32 arithmetic.

The per-unit sensitivity of the reference model (recipes/reference_int8.yaml) puts the accuracy loss
in the *activations* of a few feed-forward units (outlier channels, long tails), not in their
weights. Keeping those units' activations in fp32 while storing their weights int8 (symmetric, one
scale per output channel) keeps the artifact small: a fp32 Linear of MiniLM's feed-forward block is
2.4 MB, its int8 copy 0.6 MB. The forward dequantizes the weight and runs an fp32 GEMM (under
torch.compile with freezing the dequantized weight is a constant), so the unit computes exactly the
same thing before saving and after reloading.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qala.quantize.embedding import check_rows, quantize_rows
from qala.quantize.units import get_unit, state_prefix

logger = logging.getLogger(__name__)


class WeightOnlyInt8Linear(nn.Module):
    """A Linear whose weight is int8 with one fp32 scale per output row; inputs and outputs stay fp32."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        check_rows(qweight, scale)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, linear: nn.Linear) -> WeightOnlyInt8Linear:
        qweight, scale = quantize_rows(linear.weight)
        return cls(qweight, scale, linear.bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool) -> WeightOnlyInt8Linear:
        """A placeholder of the right shapes, for load_state_dict to fill."""
        return cls(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.ones(out_features),
            torch.zeros(out_features) if bias else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(torch.float32) * self.scale[:, None], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only per-channel"


def weight_only_int8_(model: nn.Module, units: Sequence[str]) -> dict[str, nn.Linear]:
    """Replace every nn.Linear inside the named (fp32) units by its weight-only int8 version, in place.

    Returns the replaced Linears by state-dict prefix (module path), so a caller can put them back.
    """
    replaced: dict[str, nn.Linear] = {}
    for name in units:
        unit = get_unit(model, name)
        targets = [(path, m) for path, m in unit.named_modules() if isinstance(m, nn.Linear)]
        for path, linear in targets:
            full = (state_prefix(model, name) + path) if path else state_prefix(model, name).rstrip(".")
            restore_modules(model, {full: WeightOnlyInt8Linear.from_float(linear)})
            replaced[full] = linear
    if replaced:
        logger.info("weight-only int8 for %d Linear layers of fp32 units %s", len(replaced), list(units))
    return replaced


def weight_only_modules(model: nn.Module) -> list[str]:
    """Module paths (as in the state_dict) of every WeightOnlyInt8Linear of the model."""
    return [path for path, m in model.named_modules() if isinstance(m, WeightOnlyInt8Linear)]


def restore_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put modules back by module path (undo weight_only_int8_)."""
    for path, module in modules.items():
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, module)


def empty_weight_only_(model: nn.Module, paths: Sequence[str]) -> None:
    """Replace the Linears at `paths` by empty WeightOnlyInt8Linear placeholders (the artifact's load path)."""
    for path in paths:
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path} is a {type(linear).__name__}, not a Linear")
        placeholder = WeightOnlyInt8Linear.empty(linear.out_features, linear.in_features, linear.bias is not None)
        restore_modules(model, {path: placeholder})
