"""Sampling filters against their definitions."""

from __future__ import annotations

import pytest
import torch

from dynlm.errors import ConfigError
from dynlm.infer.sampling import SamplingConfig, apply_repetition_penalty, filter_logits, select_next


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def test_top_k_keeps_k_largest():
    assert kept(filter_logits(LOGITS, SamplingConfig(temperature=1.0, top_k=2))) == {0, 1}


def test_top_p_keeps_smallest_nucleus():
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token is needed to reach 0.8
    assert kept(filter_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.8))) == {0, 1, 2}
    assert kept(filter_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.5))) == {0}
    assert kept(filter_logits(LOGITS, SamplingConfig(temperature=1.0, top_p=0.01))) == {0}


def test_min_p_is_relative_to_the_top_token():
    # threshold 0.3 * 0.5 = 0.15: keeps 0.5, 0.25, 0.15
    assert kept(filter_logits(LOGITS, SamplingConfig(temperature=1.0, min_p=0.3))) == {0, 1, 2}


def test_temperature_scales_logits():
    out = filter_logits(LOGITS, SamplingConfig(temperature=2.0))
    torch.testing.assert_close(out, LOGITS / 2)


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0]]))


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 50)
    ctx = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(select_next(logits, ctx, SamplingConfig()), logits.argmax(-1))
    cfg = SamplingConfig(temperature=1.0, top_k=10)
    a = select_next(logits, ctx, cfg, torch.Generator().manual_seed(3))
    b = select_next(logits, ctx, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # sampled tokens respect top-k
    top = logits.topk(10, -1).indices
    assert all(a[i] in top[i] for i in range(4))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    ids = select_next(logits, torch.zeros(4000, 1, dtype=torch.long), SamplingConfig(temperature=1.0),
                      torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_bad_options_are_user_errors(bad):
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)
