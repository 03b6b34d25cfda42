"""Weight-only INT8 for the word-embedding table.

The table is the largest tensor of a small encoder (MiniLM: 30,522 x 384 = 11.7M parameters, 47 MB
in fp32, more than all its linear layers together), and a lookup does no arithmetic worth an int8
kernel: the table is stored int8 with one symmetric scale per row (per token, so a rare token's
small row is not crushed by a frequent token's large one) and rows are dequantized when gathered.
The dequantized rows are computed the same way in the quantized model and after reloading, so the
artifact reproduces its logits exactly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

QMIN, QMAX = -127, 127  # symmetric: no zero point, -128 unused so that +-amax map to +-127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row): symmetric per-row int8, shared by the embedding table and
    the weight-only Linear. Rows of zeros (padding) keep a scale of 1 rather than 0, which would make 0/0."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).div(QMAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(weight / scale[:, None]).clamp(QMIN, QMAX).to(torch.int8), scale


def check_rows(qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """Raise ValueError unless qweight is 2-D int8 with one scale per row."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if scale.shape != (qweight.size(0),):
        raise ValueError(f"scale must have one entry per row ({qweight.size(0)}), got {tuple(scale.shape)}")


class Int8Embedding(nn.Module):
    """An nn.Embedding whose table is int8 with a per-row fp32 scale (buffers, so they are saved/moved)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        check_rows(qweight, scale)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.float32))
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = qweight.shape

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        qweight, scale = quantize_rows(embedding.weight)
        return cls(qweight, scale, embedding.padding_idx)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[input_ids].to(torch.float32) * self.scale[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def word_embeddings(model: nn.Module) -> nn.Module:
    return model.backbone.embeddings.word_embeddings


def word_embeddings_key(model: nn.Module) -> str:
    """The state_dict name of the word-embedding table (without .weight)."""
    return f"{model.base_model_prefix}.embeddings.word_embeddings"


def quantize_embeddings_(model: nn.Module) -> nn.Module:
    """Replace the model's word-embedding table by its per-row int8 version, in place."""
    current = word_embeddings(model)
    if isinstance(current, Int8Embedding):
        return model
    if not isinstance(current, nn.Embedding):
        raise TypeError(f"expected an nn.Embedding word-embedding table, got {type(current).__name__}")
    model.backbone.embeddings.word_embeddings = Int8Embedding.from_float(current)
    logger.info("word embeddings -> int8 per row (%d x %d)", current.num_embeddings, current.embedding_dim)
    return model


def has_int8_embeddings(model: nn.Module) -> bool:
    return isinstance(word_embeddings(model), Int8Embedding)
