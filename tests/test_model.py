import math
import random

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, BertConfig, RobertaConfig

from qala.lengths import (
    check_keep_ratios,
    check_length_config,
    constant_keep_ratios,
    constant_ratio_length_config,
    kept_per_layer,
    parse_keep_ratios,
    sample_keep_ratios,
    sample_length_config,
    smallest_keep_ratios,
    smallest_length_config,
)
from qala.model import (
    LengthAdaptiveConfig,
    LengthAdaptiveForQuestionAnswering,
    attention_significance,
    span_significance,
)


def tiny_bert_config(**kw):
    return BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
        **kw,
    )


def tiny_roberta_config():
    return RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=130,
        pad_token_id=1,
    )


def make_batch(batch=3, seq=24, pad_from=(24, 17, 9), vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(pad_from):
        mask[row, :n] = 1
    input_ids = input_ids.masked_fill(mask == 0, 0)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq // 3 :] = 1
    return input_ids, mask, token_type_ids * mask


@pytest.mark.parametrize("make_config", [tiny_bert_config, tiny_roberta_config])
def test_full_length_logits_equal_transformers(make_config):
    torch.manual_seed(0)
    reference = AutoModelForQuestionAnswering.from_config(make_config(), attn_implementation="eager").eval()
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering(
        AutoModelForQuestionAnswering.from_config(make_config(), attn_implementation="eager")
    ).eval()
    model.load_state_dict(reference.state_dict())
    assert set(model.state_dict()) == set(reference.state_dict())  # same parameter names

    input_ids, mask, token_type_ids = make_batch()
    if isinstance(reference.config, RobertaConfig):
        input_ids = input_ids.masked_fill(mask == 0, 1)
        token_type_ids = None
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
        got = model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
    real = mask.bool()
    torch.testing.assert_close(got.start_logits[real], expected.start_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.end_logits[real], expected.end_logits[real], atol=1e-5, rtol=1e-5)


def test_full_length_config_equals_no_config():
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    input_ids, mask, tt = make_batch()
    with torch.no_grad():
        a = model(input_ids, mask, tt)
        b = model(input_ids, mask, tt, length_config=[24, 24])
    torch.testing.assert_close(a.start_logits, b.start_logits)


def test_drop_and_restore_gives_every_position_a_logit():
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    input_ids, mask, tt = make_batch()
    with torch.no_grad():
        full = model(input_ids, mask, tt)
        short = model(input_ids, mask, tt, length_config=[12, 5])
    assert short.start_logits.shape == full.start_logits.shape == (3, 24)
    assert torch.isfinite(short.start_logits).all() and torch.isfinite(short.end_logits).all()
    assert not torch.allclose(short.start_logits, full.start_logits)


def test_restored_tokens_keep_state_from_layer_that_dropped_them():
    # With one layer dropping to length 1 ([CLS] only), every other token's final state is the input
    # of that layer, so its logits equal qa_outputs(state after layer 0).
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    input_ids, mask, tt = make_batch()
    with torch.no_grad():
        out = model(input_ids, mask, tt, length_config=[24, 1])
        # the reference: run layer 0 by hand at full length
        hidden = model.backbone.embeddings(input_ids=input_ids, token_type_ids=tt)
        additive = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        layer0 = model.backbone.encoder.layer[0]
        attn, _ = layer0.attention(hidden, additive)
        hidden = layer0.feed_forward_chunk(attn)
        expected = model.qa_outputs(hidden)[..., 0]
    torch.testing.assert_close(out.start_logits[:, 1:], expected[:, 1:])


def test_significance_never_prefers_padding_and_keeps_cls():
    batch, heads, seq = 2, 3, 8
    probs = torch.rand(batch, heads, seq, seq)
    probs[..., 5:] = 10.0  # padding receives huge attention: must still lose
    probs[..., 0] = 0.0  # [CLS] receives nothing: must still be kept
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[:, 5:] = False
    score = attention_significance(probs, mask)
    kept = score.topk(5, dim=1).indices
    assert sorted(kept[0].tolist()) == [0, 1, 2, 3, 4]
    assert (score[:, 5:] == float("-inf")).all()


def test_topk_in_model_never_keeps_padding_over_real_tokens():
    torch.manual_seed(1)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    input_ids, mask, tt = make_batch(pad_from=(24, 10, 6))
    captured = []
    original = attention_significance

    import qala.model as qm

    def spy(probs, m):
        score = original(probs, m)
        captured.append(m.clone())
        return score

    qm.attention_significance = spy
    try:
        with torch.no_grad():
            model(input_ids, mask, tt, length_config=[8, 4])
    finally:
        qm.attention_significance = original
    # After layer 0 keeps 8 tokens, rows with >= 8 real tokens hold only real tokens.
    mask_after_first = captured[1]
    assert mask_after_first[0].all() and mask_after_first[1].all()
    assert mask_after_first[2].sum() == 6  # row with 6 real tokens keeps all of them


def test_length_config_helpers():
    assert constant_ratio_length_config(0.5, 3, 384) == [192, 96, 48]
    assert smallest_length_config(384, 6, 0.2) == constant_ratio_length_config(0.8, 6, 384)
    rng = random.Random(0)
    for _ in range(200):
        lengths = sample_length_config(384, 6, 0.2, rng)
        prev = 384
        for n in lengths:
            assert prev * 0.8 - 1 <= n <= prev
            prev = n
        assert min(lengths) >= 2
        check_length_config(lengths, num_layers=6, max_seq_length=384)
    with pytest.raises(ValueError, match="non-increasing"):
        check_length_config([10, 20])
    with pytest.raises(ValueError, match="2 layers"):
        check_length_config([10], num_layers=2)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(
        tiny_bert_config(), LengthAdaptiveConfig(length_config=[20, 10], max_seq_length=24)
    ).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = LengthAdaptiveForQuestionAnswering.from_pretrained(tmp_path / "m").eval()
    assert loaded.qala_config.length_config == [20, 10]
    input_ids, mask, tt = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, mask, tt).start_logits, loaded(input_ids, mask, tt).start_logits)
    # The directory is a plain transformers QA checkpoint too.
    hf = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=input_ids, attention_mask=mask, token_type_ids=tt).start_logits[mask.bool()],
            model(input_ids, mask, tt, length_config=[24, 24]).start_logits[mask.bool()],
            atol=1e-5,
            rtol=1e-5,
        )


def test_layerdrop_only_in_training():
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(
        tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        LengthAdaptiveConfig(layer_dropout_prob=0.5),
    )
    input_ids, mask, tt = make_batch()
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids, mask, tt), model(input_ids, mask, tt)
    torch.testing.assert_close(a.start_logits, b.start_logits)
    model.train()
    random.seed(0)
    with torch.no_grad():
        outs = {tuple(model(input_ids, mask, tt).start_logits[0, :3].tolist()) for _ in range(12)}
    assert len(outs) > 1  # some passes skipped layers


def test_bad_length_config_is_rejected():
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config())
    input_ids, mask, tt = make_batch()
    with pytest.raises(ValueError, match="2 layers"):
        model(input_ids, mask, tt, length_config=[5])
    with pytest.raises(ValueError, match="non-increasing"):
        LengthAdaptiveConfig(length_config=[3, 9])


# ------------------------------------------------------------------ keep ratios (units of the input)


def _ragged_rows(lengths, vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g) for n in lengths]


def _padded(rows):
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return ids, mask


@pytest.mark.parametrize("ratios", [None, [1.0, 1.0], [0.7, 0.4], [0.5, 0.05]])
def test_a_window_gives_the_same_logits_padded_or_alone(ratios):
    # Each row of a mixed-length batch must score exactly as it does alone and unpadded: padding never
    # takes a slot and each row keeps its own count.
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    rows = _ragged_rows([23, 9, 16, 4])
    ids, mask = _padded(rows)
    with torch.no_grad():
        batch = model(ids, mask, keep_ratios=ratios)
        for b, row in enumerate(rows):
            alone = model(row[None], torch.ones(1, len(row), dtype=torch.long), keep_ratios=ratios)
            n = len(row)
            torch.testing.assert_close(batch.start_logits[b, :n], alone.start_logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.end_logits[b, :n], alone.end_logits[0], atol=1e-5, rtol=1e-5)


def test_keep_ratios_keep_ceil_r_n_real_tokens_per_row():
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    seen = []
    layer = model.backbone.encoder.layer[1]
    original = layer.feed_forward_chunk
    layer.feed_forward_chunk = lambda x: seen.append(x.shape[1]) or original(x)
    rows = _ragged_rows([23, 9, 16, 4])
    ratios = [0.7, 0.4]
    with torch.no_grad():
        for row in rows:
            model(row[None], keep_ratios=ratios)
    # layer 1 keeps ceil(0.4 * n) of each row's real tokens (never fewer than 1: [CLS])
    assert seen == [kept_per_layer(ratios, len(r))[1] for r in rows] == [10, 4, 7, 2]
    # In a padded batch the widest row sets the slots; the others mask their surplus.
    seen.clear()
    ids, mask = _padded(rows)
    with torch.no_grad():
        model(ids, mask, keep_ratios=ratios)
    assert seen == [10]


def test_reached_last_marks_the_tokens_the_last_layer_kept():
    # Hidden-state distillation (qala.train) compares only these tokens' states with the full model's.
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    rows = _ragged_rows([23, 9, 16, 4])
    ids, mask = _padded(rows)
    with torch.no_grad():
        out = model(ids, mask, keep_ratios=[0.7, 0.4], output_hidden_states=True)
        full = model(ids, mask, output_hidden_states=True)
        plain = model(ids, mask, keep_ratios=[0.7, 0.4])
    assert out.reached_last.sum(1).tolist() == [kept_per_layer([0.7, 0.4], len(r))[-1] for r in rows]
    assert not (out.reached_last & ~mask.bool()).any()  # never a padding slot
    assert torch.equal(full.reached_last, mask.bool())  # nothing dropped: every real token
    assert out.hidden_states[-1].shape == (*ids.shape, model.config.hidden_size)
    assert plain.hidden_states is None and plain.reached_last is None
    torch.testing.assert_close(out.start_logits, plain.start_logits)
    # A token that reached the last layer carries a different state than it would had it been dropped.
    torch.testing.assert_close(model.qa_outputs(out.hidden_states[-1])[..., 0], out.start_logits, atol=1e-5, rtol=1e-5)


def test_per_row_keep_ratio_table_matches_one_row_at_a_time():
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    rows = _ragged_rows([20, 13, 7])
    table = torch.tensor([[0.9, 0.5], [0.6, 0.6], [1.0, 0.3]])
    ids, mask = _padded(rows)
    with torch.no_grad():
        batch = model(ids, mask, keep_ratios=table)
        for b, row in enumerate(rows):
            alone = model(row[None], keep_ratios=table[b].tolist())
            torch.testing.assert_close(batch.start_logits[b, : len(row)], alone.start_logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "ratios, message",
    [
        ([0.9, 1.2], "must be in \\(0, 1\\], got 1.2"),
        ([0.0, 0.0], "got 0.0"),
        ([0.5, 0.8], "non-increasing"),
        ([0.9], "1 entries, the model has 2 layers"),
    ],
)
def test_bad_keep_ratios_name_the_value(ratios, message):
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.ones(1, 5, dtype=torch.long), keep_ratios=ratios)


def test_keep_ratio_helpers():
    assert constant_keep_ratios(0.8, 3) == [0.8, 0.64, 0.512]
    assert parse_keep_ratios("0.9,0.8", num_layers=2) == [0.9, 0.8]
    assert parse_keep_ratios("keep=0.5", num_layers=2) == [0.5, 0.25]
    assert kept_per_layer([0.7, 0.1], 10) == [7, 1]  # 0.7 * 10 keeps 7, not 8 (float noise)
    assert kept_per_layer([1.0, 0.01], 3) == [3, 1]
    rng = random.Random(0)
    for _ in range(50):
        r = sample_keep_ratios(6, 0.2, rng)
        check_keep_ratios(r, num_layers=6)
        assert r[0] >= 0.8 and all(b >= 0.8 * a - 1e-12 for a, b in zip(r, r[1:], strict=False))
    # Per-layer bounds (train.<stage>.length_drop_layer_bounds): layer i keeps [1 - b_i, 1] of layer i-1.
    bounds = [0.0, 0.1, 0.5]
    for _ in range(50):
        r = sample_keep_ratios(3, bounds, rng)
        assert r[0] == 1.0 and 0.9 <= r[1] <= 1.0 and 0.5 * r[1] - 1e-12 <= r[2] <= r[1]
    assert smallest_keep_ratios(3, bounds) == pytest.approx([1.0, 0.9, 0.45])
    assert smallest_keep_ratios(2, 0.2) == pytest.approx([0.8, 0.64])
    with pytest.raises(ValueError, match="3 LengthDrop bounds for a model of 6 layers"):
        sample_keep_ratios(6, bounds, rng)
    with pytest.raises(ValueError, match="keep_ratios"):
        LengthAdaptiveConfig(keep_ratios=[0.9, 0.8], length_config=[5, 4])


def test_fused_attention_selects_the_same_tokens_as_eager_attention():
    """Training runs SDPA (no probabilities returned) and recomputes them for the selection: the logits at
    keep ratios, per-row ratios included, must equal the eager model's (which returns the probabilities)."""
    torch.manual_seed(0)
    eager = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    fused = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    fused.load_state_dict(eager.state_dict())
    fused.backbone.set_attn_implementation("sdpa")
    input_ids, mask, token_types = make_batch()
    per_row = torch.tensor([[0.9, 0.6], [0.7, 0.5], [1.0, 0.4]])
    for keep in ([0.8, 0.5], per_row, None):
        a = eager(input_ids, mask, token_types, keep_ratios=keep)
        b = fused(input_ids, mask, token_types, keep_ratios=keep)
        real = mask.bool()
        assert torch.allclose(a.start_logits[real], b.start_logits[real], atol=1e-5)
        assert torch.allclose(a.end_logits[real], b.end_logits[real], atol=1e-5)
    # The fused model really ran without probabilities (else this test would compare eager with eager).
    layer = fused.backbone.encoder.layer[0]
    additive = torch.zeros(3, 1, 1, input_ids.size(1))
    hidden = fused.backbone.embeddings(input_ids=input_ids, token_type_ids=token_types)
    assert layer.attention(hidden, additive)[1] is None


def test_span_selection_keeps_the_tokens_the_span_head_rates_highest():
    """selection="span" ranks by the span head's max(start, end) logit on the layer's output: the kept
    tokens of layer 0 are exactly the top ones by that score ([CLS] always), and the rule changes what
    is kept compared with attention ranking (else the option would do nothing)."""
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    input_ids, mask, token_types = make_batch()
    keep = [0.5, 0.5]
    by_attention = model(input_ids, mask, token_types, keep_ratios=keep)
    model.qala_config.selection = "span"
    by_span = model(input_ids, mask, token_types, keep_ratios=keep)
    real = mask.bool()
    assert not torch.allclose(by_attention.start_logits[real], by_span.start_logits[real])
    # Layer 0's score by hand: the span head on the attention output, padding never kept, [CLS] always.
    layer = model.backbone.encoder.layer[0]
    hidden = model.backbone.embeddings(input_ids=input_ids, token_type_ids=token_types)
    additive = (~real)[:, None, None, :].float() * torch.finfo(torch.float32).min
    span_logits = model.qa_outputs(layer.attention(hidden, additive)[0])
    score = span_significance(span_logits, real)
    assert torch.equal(
        score[real & (torch.arange(24) > 0)], span_logits.max(dim=-1).values[real & (torch.arange(24) > 0)]
    )
    assert bool((score[:, 0] == float("inf")).all()) and bool((score[~real] == float("-inf")).all())
    with pytest.raises(ValueError, match="selection"):
        LengthAdaptiveConfig(selection="random")


def test_keep_margins_keep_the_tokens_within_the_margin_of_each_rows_best():
    """keep_margins (the LTP-style threshold): after layer i a row keeps [CLS] plus every real token whose span
    score is within margins[i] of its best, under the keep_ratios cap; kept_tokens reports the counts, a row
    scores the same alone or in a padded batch, and an unbounded margin changes nothing."""
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    model.qala_config.selection = "span"
    with torch.no_grad():
        model.qa_outputs.weight *= 50  # a random head's logits all lie within 0.5 of each other
    rows = _ragged_rows([23, 9, 16, 4])
    ids, mask = _padded(rows)
    with torch.no_grad():
        full = model(ids, mask)
        wide = model(ids, mask, keep_margins=[1e9, 1e9])
        tight = model(ids, mask, keep_margins=[0.5, None])
        capped = model(ids, mask, keep_ratios=[0.7, 0.4], keep_margins=[None, 1e9])
        # Layer 0's counts by hand: the span head on the attention output, real tokens within 0.5 of the best.
        hidden = model.backbone.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        real = mask.bool()
        additive = (~real)[:, None, None, :].float() * torch.finfo(torch.float32).min
        score = model.qa_outputs(model.backbone.encoder.layer[0].attention(hidden, additive)[0]).max(dim=-1).values
        score = score.masked_fill(~real, float("-inf"))[:, 1:]
        expected = 1 + (score >= score.max(dim=1, keepdim=True).values - 0.5).sum(dim=1)
        for b, row in enumerate(rows):
            alone = model(row[None], keep_margins=[0.5, None])
            torch.testing.assert_close(tight.start_logits[b, : len(row)], alone.start_logits[0], atol=1e-5, rtol=1e-5)
    assert full.kept_tokens.tolist() == [[n, n] for n in (23, 9, 16, 4)]
    torch.testing.assert_close(wide.start_logits[real], full.start_logits[real])  # padding slots: no logit to keep
    assert tight.kept_tokens[:, 0].tolist() == expected.tolist()
    assert (tight.kept_tokens[:, 0] < mask.sum(dim=1)).any()  # the margin dropped something
    assert torch.equal(tight.kept_tokens[:, 1], tight.kept_tokens[:, 0])  # None: that layer keeps what it has
    assert capped.kept_tokens.tolist() == [kept_per_layer([0.7, 0.4], len(r)) for r in rows]
    # LengthDrop's margin draws: a [batch, layers] table, one margin per row (inf: none), as each row alone.
    table = torch.tensor([[0.5, math.inf], [math.inf, math.inf], [0.2, 0.1], [1.0, 0.5]])
    with torch.no_grad():
        per_row = model(ids, mask, keep_margins=table)
        for b, row in enumerate(rows):
            margins = [None if math.isinf(m) else m for m in table[b].tolist()]
            alone = model(row[None], keep_margins=margins)
            torch.testing.assert_close(per_row.start_logits[b, : len(row)], alone.start_logits[0], atol=1e-5, rtol=1e-5)
            assert per_row.kept_tokens[b].tolist() == alone.kept_tokens[0].tolist()
    assert per_row.kept_tokens[1].tolist() == [9, 9]
    with pytest.raises(ValueError, match="keep_margins"):
        LengthAdaptiveConfig(keep_margins=[1.0, -2.0])
