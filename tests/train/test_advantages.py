"""Advantage estimators against plain-Python loops written from the formulas."""

import math

import pytest
import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.train.advantages import gae, group_advantages, masked_mean, normalized_future_rewards, whiten


def _ragged(batch=5, steps=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 4, 0, 7])[:batch]
    mask = (torch.arange(steps)[None, :] < lengths[:, None]).float()
    return torch.randn(batch, steps, generator=gen), torch.randn(batch, steps, generator=gen), mask, lengths


def test_group_advantages_match_the_formula():
    rewards = torch.tensor([1.0, 2.0, 4.0, -1.0, -1.0, -1.0])
    adv = group_advantages(rewards, group_size=3)
    for g in range(2):
        group = rewards[3 * g : 3 * g + 3].tolist()
        mean = sum(group) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)
        for j in range(3):
            assert adv[3 * g + j].item() == pytest.approx((group[j] - mean) / (std + 1e-4), rel=1e-6)
    assert torch.all(adv[3:] == 0)  # identical rewards: no signal, no NaN


def test_group_advantages_without_scaling_and_bad_groups():
    rewards = torch.tensor([1.0, 3.0])
    assert group_advantages(rewards, 2, scale=False).tolist() == [-1.0, 1.0]
    with pytest.raises(GrpoKdError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_gae_matches_a_per_sequence_loop():
    rewards, values, mask, lengths = _ragged()
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths.tolist()):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            assert adv[b, t].item() == pytest.approx(running, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(running + values[b, t].item(), abs=1e-5)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("include_current", [True, False])
def test_normalized_future_rewards_match_minillm_formula(normalize, include_current):
    rewards, _, mask, lengths = _ragged(seed=1)
    gamma = 0.95
    out = normalized_future_rewards(rewards, mask, gamma=gamma, length_normalize=normalize,
                                    include_current=include_current)
    first = 0 if include_current else 1  # LMOps: from t on; eq. 7: from t + 1 on
    for b, n in enumerate(lengths.tolist()):
        for t in range(n):
            later = [gamma ** (u - t - first) * rewards[b, u].item() for u in range(t + first, n)]
            expected = sum(later) / max(len(later), 1) if normalize else sum(later)
            assert out[b, t].item() == pytest.approx(expected, abs=1e-5)
        assert torch.all(out[b, n:] == 0)


def test_masked_mean_and_whiten_ignore_padding():
    values = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, mask, dim=1).tolist() == [2.0, 5.0]
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    white = whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(white**2, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(white[mask == 0] == 0)
