"""qala.lengths: the one length representation (keep ratios of the real length) and the one converter."""

import random

import pytest
import torch

from qala.lengths import (
    config_json,
    config_key,
    config_kwargs,
    config_label,
    constant_config,
    constant_name,
    kept_table,
    key_kwargs,
    resolve,
    sandwich,
)
from qala.model import LengthAdaptiveForQuestionAnswering
from tests.test_model import make_batch, tiny_bert_config


def test_resolve_keeps_min_k_n_real_tokens_of_an_absolute_configuration():
    mask = torch.tensor([[1] * 10 + [0] * 14, [1] * 24, [1] * 3 + [0] * 21])
    lengths = resolve(mask, 3, length_config=[20, 12, 5])
    assert lengths.widths == (20, 12, 5)
    assert kept_table(mask, 3, keep_ratios=lengths.ratios).tolist() == [[10, 10, 5], [20, 12, 5], [3, 3, 3]]
    assert resolve(mask, 3).ratios is None and resolve(mask, 3).widths is None
    listed = resolve(mask, 3, keep_ratios=[1.0, 0.5, 0.25])
    assert listed.widths is None and listed.ratios.shape == (3, 3) and listed.ratios.dtype == torch.float64
    with pytest.raises(ValueError, match="not both"):
        resolve(mask, 3, keep_ratios=[1, 1, 1], length_config=[3, 3, 3])
    with pytest.raises(ValueError, match="3 layers"):
        resolve(mask, 3, length_config=[3, 3])


def test_an_absolute_configuration_runs_as_its_resolved_ratios():
    # The paper's form is converted, not run by a code path of its own: the forward given length_config and the
    # forward given resolve()'s ratios keep the same tokens, so real positions get the same logits (the static
    # widths change only how many surplus, masked slots a layer carries).
    torch.manual_seed(0)
    model = LengthAdaptiveForQuestionAnswering.from_config(tiny_bert_config()).eval()
    input_ids, mask, token_type_ids = make_batch()
    inputs = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}
    with torch.no_grad():
        absolute = model(**inputs, length_config=[14, 6])
        ratios = model(**inputs, keep_ratios=resolve(mask, 2, length_config=[14, 6]).ratios)
        full = model(**inputs)
    real = mask.bool()
    assert torch.allclose(absolute.start_logits[real], ratios.start_logits[real], atol=1e-5)
    assert torch.allclose(absolute.end_logits[real], ratios.end_logits[real], atol=1e-5)
    assert not torch.allclose(absolute.start_logits[real], full.start_logits[real], atol=1e-3)


def test_sandwich_draws_per_row_ratios_or_one_padded_configuration_per_sub_model():
    draws = sandwich(3, 0.2, 2, random.Random(7), batch_size=4)
    assert draws[0] == {"keep_ratios": [0.8, 0.64, 0.512]}  # the smallest first, every layer at the bound
    assert [d["keep_ratios"].shape for d in draws[1:]] == [(4, 3), (4, 3)]
    again = sandwich(3, 0.2, 2, random.Random(7), batch_size=4)
    assert all(torch.equal(a["keep_ratios"], b["keep_ratios"]) for a, b in zip(draws[1:], again[1:], strict=True))
    padded = sandwich(3, 0.2, 2, random.Random(7), batch_size=4, padded_length=40)
    assert padded[0] == {"length_config": [32, 26, 21]} and all(len(d["length_config"]) == 3 for d in padded)
    with pytest.raises(ValueError, match="one bound for every layer"):
        sandwich(3, [0.1, 0.2, 0.3], 1, random.Random(0), batch_size=2, padded_length=40)
    # margin_draws: the last random draws give each row one margin in margin_range at the layers that may drop
    mixed = sandwich(3, [0.0, 0.2, 0.3], 2, random.Random(7), batch_size=4, margin_draws=1, margin_range=(3, 6))
    assert list(mixed[1]) == ["keep_ratios"] and list(mixed[2]) == ["keep_margins"]
    margins = mixed[2]["keep_margins"]
    assert margins.shape == (4, 3) and torch.isinf(margins[:, 0]).all()  # layer 0's bound is 0: it never drops
    assert ((margins[:, 1:] >= 3) & (margins[:, 1:] <= 6)).all() and torch.equal(margins[:, 1], margins[:, 2])
    assert len(set(margins[:, 1].tolist())) == 4  # one margin per row


def test_one_name_and_one_form_per_configuration():
    assert constant_config(0.5, 2) == {"keep_ratios": [0.5, 0.25]}
    assert constant_config(0.5, 2, padded_length=64) == {"length_config": [32, 16]}
    assert constant_name(0.8) == "keep_0.8" and constant_name(0.8, padded=True) == "padded_keep_0.8"
    assert config_json([1, 0.5]) == {"keep_ratios": [1.0, 0.5], "length_config": None}
    assert config_kwargs(length_config=[8, 4]) == {"length_config": [8, 4]} and config_kwargs() == {}
    assert config_label([1, 0.75]) == "keep_ratios=1,0.75" and config_label(None, [384, 256]) == "length_config=384,256"
    assert config_label() == "full" and config_label([1.0, 1.0]) == "keep_ratios=1,1"  # as served (a point)
    for kwargs in ({"keep_ratios": [1.0, 0.5]}, {"length_config": [20, 10]}):
        assert key_kwargs(config_key(2, max_seq_length=24, **kwargs)) == kwargs
    assert config_key(2, length_config=[24, 24], max_seq_length=24) is None  # keeps every position: full length


def test_a_keep_ratio_that_is_not_a_number_is_named_not_a_type_error():
    from qala.lengths import check_keep_ratios

    for bad in (["0.5", 0.25], [None, 0.5]):
        with pytest.raises(ValueError, match=r"keep_ratios entries must be in \(0, 1\], got"):
            check_keep_ratios(bad)
