"""The length-adaptive encoder for extractive question answering.

This is the model of the Length-Adaptive Transformer (Kim & Cho, 2021) as used by QuaLA-MiniLM
(Guskin et al., 2022): a BERT or RoBERTa encoder that, after the attention of each layer, keeps only
the `keep_ratios[i]` share of its real tokens that rank most significant and runs the feed-forward block on those alone.
Dropped tokens are not lost: Drop-and-Restore writes every token's last computed hidden state back
into a full-length sequence before the span head, so every input position gets a start/end logit.

The model wraps the Hugging Face modules (embeddings, attention, feed-forward, QA head) instead of
copying them; its parameter names are exactly those of `<Arch>ForQuestionAnswering`, so a saved
directory also loads with `AutoModelForQuestionAnswering.from_pretrained` (at full length).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForQuestionAnswering, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from qala.lengths import Lengths, check_keep_ratios, check_length_config, keep_counts, resolve
from qala.utils import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

QALA_CONFIG_NAME = "qala_config.json"
WEIGHTS_NAME = "model.safetensors"


# The forward's token inputs, in the order the exported graphs take them.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def batch_inputs(
    columns: Mapping[str, Any], *, device: torch.device | str | None = None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """The model's keyword tensors from featurized windows (column name -> one list per window).

    Windows of different lengths (unpadded featurization) are right-padded to the longest window of
    this batch and no further, with attention_mask 0 on the padding, so a batch never carries more
    positions than its longest real window. Columns other than MODEL_INPUTS are ignored.
    """
    tensors = {}
    for name in MODEL_INPUTS:
        if name not in columns:
            continue
        rows = columns[name]
        if isinstance(rows, torch.Tensor):
            tensors[name] = rows.to(device=device, dtype=torch.long)
            continue
        longest = max((len(row) for row in rows), default=0)
        fill = pad_id if name == "input_ids" else 0
        tensors[name] = torch.tensor([list(row) + [fill] * (longest - len(row)) for row in rows], device=device)
    return tensors


# Token-ranking rules of LengthAdaptiveConfig.selection (see token_significance).
SELECTION_RULES = ("attention", "span")


@dataclass
class LengthAdaptiveConfig:
    """What the length-adaptive wrapper adds to the backbone's own config.json.

    Saved as qala_config.json beside the weights; the backbone's config.json stays transformers'.
    """

    # The configuration a call runs when it names none (None: full length), in qala's one unit: per
    # layer, the share of each window's real token count that survives it (qala/lengths.py).
    keep_ratios: list[float] | None = None
    # The same in the paper's absolute form (kept positions of a window padded to max_seq_length), for
    # directories written by LAT-style recipes; converted by qala.lengths.resolve. At most one is set.
    length_config: list[int] | None = None
    # Probability of skipping a whole layer in training (LayerDrop, Fan et al. 2019).
    layer_dropout_prob: float = 0.0
    # The padded sequence length that length configurations are written for.
    max_seq_length: int = 384
    # How a layer ranks the tokens it keeps. "attention": the attention each token receives, summed over
    # heads and queries (LAT, PoWER-BERT). "span": the span head applied to the layer's attention output,
    # max(start, end) logit: keeps the tokens the model already rates as likely answer boundaries
    # (question-aware, since every state has attended to the question). On real, unpadded dev windows
    # the reference model keeps 68.14 F1 at constant keep 0.9 with "span" against 59.67 with
    # "attention" (full 71.18; benchmarks/results/ratio_training.json), at 2*H MACs per token instead of
    # a heads x n x n sum.
    selection: str = "attention"
    # Per-layer logit margins (Learned Token Pruning's threshold, Kim et al. 2022, in the span rule's units):
    # after layer i a row also drops every token whose significance is more than keep_margins[i] below its
    # best real token's, so the count kept varies with the window (a window whose answer the layer already
    # rates clearly keeps few tokens, an ambiguous one many), under the keep_ratios cap. None (the default,
    # or an entry of None): the cap alone, a fixed share of every window.
    keep_margins: list[float | None] | None = None

    def __post_init__(self) -> None:
        if self.keep_ratios is not None and self.length_config is not None:
            raise ValueError("set keep_ratios or length_config, not both")
        if self.keep_ratios is not None:
            self.keep_ratios = [float(r) for r in self.keep_ratios]
            check_keep_ratios(self.keep_ratios)
        if self.length_config is not None:
            self.length_config = [int(n) for n in self.length_config]
            check_length_config(self.length_config, max_seq_length=self.max_seq_length)
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"selection must be one of {list(SELECTION_RULES)}, got {self.selection!r}")
        if self.keep_margins is not None:
            self.keep_margins = [None if m is None else float(m) for m in self.keep_margins]
            if any(m is not None and not m >= 0 for m in self.keep_margins):
                raise ValueError(f"keep_margins entries must be >= 0 or null, got {self.keep_margins}")
        if not 0.0 <= self.layer_dropout_prob < 1.0:
            raise ValueError(f"layer_dropout_prob must be in [0, 1), got {self.layer_dropout_prob}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> LengthAdaptiveConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; expected only {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------- cost model


def macs_per_sample(config: Any, length_config: Sequence[int] | None, seq_length: int) -> int:
    """Multiply-accumulates of one padded window of `seq_length` tokens through the length-adaptive model.

    `config` is the backbone's transformers config (hidden_size H, intermediate_size I,
    num_attention_heads h, num_hidden_layers L). Per layer, with n_in tokens entering and n_out kept
    (n_out = min(length_config[i], n_in); None keeps everything):
      Q, K, V and output projections   4 * n_in * H * H
      attention scores and weighted sum 2 * n_in * n_in * H     (all heads together)
      token selection, when n_out < n_in: h * n_in * n_in       (the significance sum over heads and
                                                                  queries, counted as one MAC per add;
                                                                  the top-k itself is a comparison)
      feed-forward on kept tokens only  2 * n_out * H * I
    plus the span head on every restored position, seq_length * H * 2. Embeddings are lookups and
    biases, LayerNorm, softmax, GELU and Drop-and-Restore's scatter are not multiply-accumulates: 0.
    """
    hidden, inner, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    num_layers = config.num_hidden_layers
    lengths = list(length_config) if length_config is not None else [seq_length] * num_layers
    if len(lengths) != num_layers:
        raise ValueError(f"length_config has {len(lengths)} entries, the model has {num_layers} layers")
    total, n_in = 0, seq_length
    for keep in lengths:
        n_out = min(int(keep), n_in)
        total += 4 * n_in * hidden * hidden + 2 * n_in * n_in * hidden + 2 * n_out * hidden * inner
        if n_out < n_in:
            total += heads * n_in * n_in
        n_in = n_out
    return total + seq_length * hidden * 2


def _flat_rows(indices: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Row numbers of x.reshape(batch * seq_length, hidden) for indices [batch, k] into each row's positions."""
    offsets = torch.arange(indices.size(0), device=indices.device)[:, None] * seq_length
    return (indices + offsets).reshape(-1)


def _gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[b, indices[b]] for each row b; x is [batch, seq] or [batch, seq, hidden].

    Hidden states are gathered as whole rows of the flattened tensor (one Gather in an exported graph), not
    with gather() on an index expanded to the hidden size: that exports as a Broadcast and a GatherElements,
    which cost OpenVINO's INT8 graph 0.9 ms of a 6.9 ms batch-1 call (Zen 5, 160 tokens), more than the
    GEMMs the dropped tokens saved."""
    if x.dim() == 2:
        return x.gather(1, indices)
    batch, seq, hidden = x.shape
    rows = x.reshape(batch * seq, hidden).index_select(0, _flat_rows(indices, seq))
    return rows.reshape(batch, indices.size(1), hidden)


def _restore(
    restored: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, carried: torch.Tensor
) -> torch.Tensor:
    """Write the carried tokens' hidden states back at their input positions; other slots leave theirs.

    Whole rows of the flattened tensor (index_put: one ScatterND when exported) for the reason _gather_tokens
    gives; each row holds every input position at most once, so no row is written twice."""
    batch, seq, size = restored.shape
    flat = _flat_rows(positions, seq)
    rows = restored.reshape(batch * seq, size)
    current = torch.where(carried.reshape(-1, 1), hidden.reshape(-1, size), rows.index_select(0, flat))
    return rows.index_put((flat,), current).reshape(batch, seq, size)


def kept_after_layer(
    ratios: torch.Tensor | None, width: int | None, real_lengths: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor | None:
    """How many tokens each row keeps after a layer ([batch]), or None when the layer selects nothing.

    `ratios`: the layer's [batch] keep ratios of each row's real length; `mask` marks the tokens still
    live in the current slots. With a static `width` (qala.lengths.Lengths) the layer selects exactly
    when the width is below the current slot count, decided on shapes alone (one traced graph);
    otherwise when some row keeps fewer tokens than it has live."""
    if ratios is None:
        return None
    kept = torch.minimum(keep_counts(ratios, real_lengths), mask.sum(dim=1))
    if width is not None:
        return kept if width < mask.size(1) else None
    return kept if bool((kept < mask.sum(dim=1)).any()) else None


def kept_within_margin(
    significance: torch.Tensor, margin: float | torch.Tensor, cap: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """How many tokens each row keeps ([batch]) when it drops the live tokens scoring more than `margin` (a
    number, or one per row: [batch], inf keeping all) below its best real token, at most `cap` (the keep_ratios
    count). The first token (+inf) counts as kept."""
    finite = significance.masked_fill(significance.isinf(), float("-inf"))
    best = finite.max(dim=1).values
    within = ((significance >= (best - margin)[:, None]) & mask).sum(dim=1)
    return torch.minimum(within, cap)


def layer_margin(margins: Sequence[float | None] | torch.Tensor | None, i: int) -> float | torch.Tensor | None:
    """Layer i's margin from a per-layer list (None: no margin) or a [batch, layers] table (inf: none)."""
    if margins is None:
        return None
    return margins[:, i] if isinstance(margins, torch.Tensor) else margins[i]


def select_tokens(
    significance: torch.Tensor,
    kept: torch.Tensor,
    width: int | torch.Tensor,
    attention_output: torch.Tensor,
    mask: torch.Tensor,
    carried: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the `kept[b]` most significant tokens of each row b, in input order, in `width` slots.

    `width` (>= every kept[b]) is the new sequence length: a Python int, or a tensor computed in a traced
    graph (the exported engines of qala.quantize.onnx). Rank r of a row survives if r < kept[b]: the
    surplus slots of shorter rows (and of a static width wider than any row keeps) are masked and not
    carried, so a row's kept tokens do not depend on the width or on the other rows of the batch.
    Returns (attention_output, mask, carried, positions) gathered at the kept slots.
    """
    top = significance.topk(width, dim=1).indices
    survives = torch.arange(top.size(1), device=top.device)[None, :] < kept[:, None]
    # Sorted so survivors keep their input order and [CLS] stays first.
    top, order = top.sort(dim=1)
    survives = survives.gather(1, order)
    return (
        _gather_tokens(attention_output, top),
        _gather_tokens(mask, top) & survives,
        _gather_tokens(carried, top) & survives,
        _gather_tokens(positions, top),
    )


def attention_significance(attention_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much attention each token receives, summed over heads and (real) queries: [batch, seq].

    Padded positions score -inf so they never take a top-k slot from a real token, whatever the
    attention values are; the first token ([CLS]/<s>) scores +inf so it is always kept.
    """
    probs = attention_probs.detach().float()
    # One batched matmul over (heads x queries); multiplying then summing would materialise another
    # [batch, heads, seq, seq] tensor per layer (measured: 11% of a LengthDrop step).
    received = torch.einsum("bhqk,bq->bk", probs, mask.to(probs.dtype))
    received = received.masked_fill(~mask, float("-inf"))
    is_first = torch.arange(received.size(1), device=received.device) == 0
    return received.masked_fill(is_first, float("inf"))


def span_significance(span_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max(start, end) logit of each token ([batch, seq, 2] -> [batch, seq]); padding -inf, first token +inf."""
    score = span_logits.detach().float().max(dim=-1).values.masked_fill(~mask, float("-inf"))
    is_first = torch.arange(score.size(1), device=score.device) == 0
    return score.masked_fill(is_first, float("inf"))


def token_significance(
    rule: str,
    mask: torch.Tensor,
    *,
    attention_probs: torch.Tensor | None,
    attention_output: torch.Tensor,
    qa_outputs: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The score a layer ranks its tokens by ([batch, seq], higher kept first) under `rule`
    (LengthAdaptiveConfig.selection); `attention_probs` may be None under "span", which does not read them."""
    if rule == "span":
        return span_significance(qa_outputs(attention_output), mask)
    return attention_significance(attention_probs, mask)


def recompute_attention_probs(attention: nn.Module, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + mask) of a transformers self-attention module, without gradient or dropout.

    Fused attention kernels (SDPA: flash attention on CPU) return no probabilities. Training runs them
    because eager attention with dropout on the [batch, heads, seq, seq] probabilities measured 6.7x
    slower per layer (forward + backward, 32 x 184 tokens) than SDPA; the selection then needs only
    these forward-only probabilities, at the cost of two projections without gradient.
    """
    self_attention = attention.self
    batch, seq, _ = hidden.shape
    shape = (batch, seq, -1, self_attention.attention_head_size)
    with torch.no_grad():
        query = self_attention.query(hidden).view(shape).transpose(1, 2)
        key = self_attention.key(hidden).view(shape).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) * self_attention.scaling + additive_mask
        return scores.softmax(dim=-1)


@dataclass
class LengthAdaptiveQAOutput(QuestionAnsweringModelOutput):
    """transformers' QA output plus, with output_hidden_states, `reached_last` [batch, seq]: the input
    positions whose token reached the last layer (the others carry the state of the layer that dropped them),
    and `kept_tokens` [batch, layers run]: the real tokens of each row that each layer's feed-forward block ran on."""

    reached_last: torch.Tensor | None = None
    selection_logits: tuple[torch.Tensor, ...] | None = None
    kept_tokens: torch.Tensor | None = None


class LengthAdaptiveForQuestionAnswering(nn.Module):
    """A BERT/RoBERTa encoder with per-layer token dropping, Drop-and-Restore and LayerDrop, plus a span head."""

    def __init__(self, qa_model: PreTrainedModel, config: LengthAdaptiveConfig | None = None) -> None:
        super().__init__()
        backbone = getattr(qa_model, qa_model.base_model_prefix, None)
        layers = getattr(getattr(backbone, "encoder", None), "layer", None)
        if (
            layers is None
            or not hasattr(qa_model, "qa_outputs")
            or not all(hasattr(layer, name) for layer in layers for name in ("attention", "feed_forward_chunk"))
        ):
            raise ValueError(
                f"model type {qa_model.config.model_type!r} is not supported: qala needs a BERT-style encoder "
                "(bert, roberta and their relatives) with encoder.layer[i].attention/feed_forward_chunk and qa_outputs"
            )
        # Token selection reads the attention probabilities, which only the eager kernel returns.
        qa_model.set_attn_implementation("eager")
        # Registered under the backbone's own prefix ("bert", "roberta") so that parameter names
        # match transformers' <Arch>ForQuestionAnswering exactly.
        self.base_model_prefix = qa_model.base_model_prefix
        self.add_module(self.base_model_prefix, backbone)
        self.qa_outputs = qa_model.qa_outputs
        # transformers' config stays `config` (Trainer and pipelines read it); ours sits beside it.
        self.config = qa_model.config
        self.qala_config = config or LengthAdaptiveConfig()

    @property
    def backbone(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    @property
    def num_layers(self) -> int:
        return len(self.backbone.encoder.layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        length_config: Sequence[int] | None = None,
        keep_ratios: Sequence[float] | torch.Tensor | None = None,
        keep_margins: Sequence[float | None] | torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_selection_logits: bool = False,
    ) -> LengthAdaptiveQAOutput:
        """Span logits for every input position.

        How many tokens each layer keeps, for this call (neither given: the config's, else full length):
        `keep_ratios`: per-layer shares of each row's real token count (attention_mask sum); a list
        for the whole batch or a [batch, layers] tensor, one configuration per row (LengthDrop).
        `length_config`: the paper's absolute form, converted to keep ratios by qala.lengths.resolve.
        `keep_margins`: per-layer logit margins under that cap (LengthAdaptiveConfig.keep_margins), else the config's;
        a [batch, layers] tensor gives each row its own (inf: no margin), as LengthDrop's margin draws do.
        In a batch padded to its longest row, each row keeps its own count and the surplus slots of
        shorter rows are masked, so a row's logits at its real positions do not depend on the batch.
        `output_hidden_states`: also the last states and `reached_last` (hidden distillation, qala.train).
        `output_selection_logits`: also each layer's span head on its attention output, what the "span" rule
        ranks by (selection distillation, qala.train); full length only, where every layer holds every position.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = self._lengths_of_call(attention_mask, length_config, keep_ratios, output_selection_logits)
        selection_logits = [] if output_selection_logits else None
        margins = self.qala_config.keep_margins if keep_margins is None else keep_margins
        kept_tokens = []  # per layer, the real tokens each row ran the feed-forward block on (the MACs)
        mask = attention_mask.bool()
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        batch_size, seq_length, hidden_size = hidden.shape
        ratios, widths = lengths.ratios, lengths.widths
        real_lengths = mask.sum(dim=1)
        # positions[b, j]: where the j-th surviving token of row b sits in the input.
        positions = torch.arange(seq_length, device=hidden.device).expand(batch_size, -1)
        restored = None  # Drop-and-Restore buffer: each token's hidden state as of the last layer that kept it
        # carried[b, j]: slot j still holds a token being computed (padding included); False only for
        # the surplus slots a shorter row masks in a batch, whose tokens were already restored.
        carried = torch.ones_like(mask)

        for i, layer in enumerate(self.backbone.encoder.layer):
            if self._layer_dropped():
                continue  # LayerDrop: the layer is skipped and so is its token selection

            additive_mask = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
            attention_output, attention_probs = layer.attention(hidden, additive_mask)
            if selection_logits is not None:
                selection_logits.append(self.qa_outputs(attention_output))
            # kept[b]: how many tokens row b keeps after this layer (None: all of them).
            width = None if widths is None else widths[i]
            kept = kept_after_layer(None if ratios is None else ratios[:, i], width, real_lengths, mask)
            margin = layer_margin(margins, i)
            if kept is not None or margin is not None:
                significance = self._significance(layer, hidden, additive_mask, mask, attention_output, attention_probs)
                if margin is not None:
                    kept = kept_within_margin(significance, margin, mask.sum(dim=1) if kept is None else kept, mask)
                # Record every live token's state before some of them stop being updated.
                restored = hidden.new_zeros(batch_size, seq_length, hidden_size) if restored is None else restored
                restored = _restore(restored, positions, hidden, carried)
                # A static width is a Python int: no data-dependent int() there, so torch.compile traces
                # it as one graph (CompiledQA); otherwise the width is the most any row keeps.
                # A margin makes the counts data-dependent: the width is then always the most any row keeps.
                width = width if width is not None and margin is None else int(kept.max())
                attention_output, mask, carried, positions = select_tokens(
                    significance, kept, width, attention_output, mask, carried, positions
                )

            hidden = layer.feed_forward_chunk(attention_output)
            kept_tokens.append(mask.sum(dim=1))

        reached_last = None
        if output_hidden_states:
            # positions holds each input position at most once, so the scatter writes each once.
            reached_last = torch.zeros_like(attention_mask, dtype=torch.bool).scatter(1, positions, mask & carried)
        if restored is not None:
            hidden = _restore(restored, positions, hidden, carried)

        return qa_output(
            self.qa_outputs(hidden),
            start_positions,
            end_positions,
            hidden_states=(hidden,) if output_hidden_states else None,
            reached_last=reached_last,
            selection_logits=None if selection_logits is None else tuple(selection_logits),
            kept_tokens=torch.stack(kept_tokens, dim=1) if kept_tokens else None,
        )

    def _layer_dropped(self) -> bool:
        """LayerDrop (training only): skip this layer with probability layer_dropout_prob."""
        probability = self.qala_config.layer_dropout_prob
        return self.training and probability > 0 and random.random() < probability

    def _significance(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        additive_mask: torch.Tensor,
        mask: torch.Tensor,
        attention_output: torch.Tensor,
        attention_probs: torch.Tensor | None,
    ) -> torch.Tensor:
        """The score this layer ranks its live tokens by, under the model's selection rule."""
        rule = self.qala_config.selection
        if rule == "attention" and attention_probs is None:
            # A fused kernel returns no probabilities (training uses SDPA, see recompute_attention_probs).
            attention_probs = recompute_attention_probs(layer.attention, hidden, additive_mask)
        return token_significance(
            rule, mask, attention_probs=attention_probs, attention_output=attention_output, qa_outputs=self.qa_outputs
        )

    def _lengths_of_call(
        self,
        attention_mask: torch.Tensor,
        length_config: Sequence[int] | None,
        keep_ratios: Sequence[float] | torch.Tensor | None,
        full_length_only: bool = False,
    ) -> Lengths:
        """What a forward call keeps: its own configuration, else the config's, resolved to keep ratios;
        `full_length_only`: refuse a call that would drop tokens (output_selection_logits)."""
        if length_config is None and keep_ratios is None:
            length_config, keep_ratios = self.qala_config.length_config, self.qala_config.keep_ratios
        lengths = resolve(attention_mask, self.num_layers, keep_ratios, length_config)
        if full_length_only and lengths.ratios is not None:
            raise ValueError("output_selection_logits needs a full-length call (no keep_ratios or length_config)")
        return lengths

    # ---------------------------------------------------------------- save / load

    def save_pretrained(self, save_directory: str | Path) -> None:
        """config.json (transformers'), qala_config.json, model.safetensors; written atomically."""
        config = copy.deepcopy(self.config)
        config.architectures = [MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES[config.model_type]]
        with atomic_directory(save_directory) as tmp:
            config.save_pretrained(tmp)
            atomic_write_text(tmp / QALA_CONFIG_NAME, self.qala_config.to_json())
            state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        length_config: Sequence[int] | None = None,
        layer_dropout_prob: float | None = None,
        max_seq_length: int | None = None,
        **hf_kwargs,
    ) -> LengthAdaptiveForQuestionAnswering:
        """Load a qala directory, or any BERT/RoBERTa checkpoint (local directory or hub id).

        A checkpoint without a QA head gets a freshly initialised one (transformers logs which weights).
        Keyword arguments other than the LengthAdaptiveConfig fields go to transformers' from_pretrained.
        """
        qala_config_file = Path(name_or_path) / QALA_CONFIG_NAME
        config = (
            LengthAdaptiveConfig.from_json_file(qala_config_file)
            if qala_config_file.is_file()
            else LengthAdaptiveConfig()
        )
        overrides = {
            "length_config": list(length_config) if length_config is not None else None,
            "layer_dropout_prob": layer_dropout_prob,
            "max_seq_length": max_seq_length,
        }
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
        qa_model = AutoModelForQuestionAnswering.from_pretrained(
            str(name_or_path), attn_implementation="eager", **hf_kwargs
        )
        model = cls(qa_model, config)
        if config.length_config is not None:
            check_length_config(config.length_config, num_layers=model.num_layers)
        return model

    @classmethod
    def from_config(
        cls, backbone_config: PretrainedConfig, config: LengthAdaptiveConfig | None = None
    ) -> LengthAdaptiveForQuestionAnswering:
        """A randomly initialised model (tests, architecture-only benchmarks)."""
        qa_model = AutoModelForQuestionAnswering.from_config(backbone_config, attn_implementation="eager")
        return cls(qa_model, config)


def qa_output(
    logits: torch.Tensor, start_positions: torch.Tensor | None, end_positions: torch.Tensor | None, **extras: Any
) -> LengthAdaptiveQAOutput:
    """Split [batch, seq, 2] span logits into start and end; with both positions given, add the span loss."""
    start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
    labelled = start_positions is not None and end_positions is not None
    loss = span_loss(start_logits, end_logits, start_positions, end_positions) if labelled else None
    return LengthAdaptiveQAOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, **extras)


def span_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """Mean of start and end cross-entropy, as transformers' BertForQuestionAnswering computes it."""
    ignored_index = start_logits.size(1)
    start_positions = start_positions.view(-1).clamp(0, ignored_index)
    end_positions = end_positions.view(-1).clamp(0, ignored_index)
    loss_fct = nn.CrossEntropyLoss(ignore_index=ignored_index)
    return (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
