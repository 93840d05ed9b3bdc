"""Reward components and their weighted combination."""

import pytest
import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.train import rewards


def test_teacher_loglik_is_the_masked_mean():
    lp = torch.tensor([[-1.0, -3.0, -50.0], [-2.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rewards.teacher_loglik(lp, mask).tolist() == [-2.0, -2.0]
    assert rewards.inverse_loss(lp, mask).tolist() == [-2.0, -2.0]


def test_log_ratio_and_length():
    t = torch.tensor([[-1.0, -2.0]])
    s = torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1, 0]])
    assert rewards.log_ratio(t, s, mask).tolist() == [[0.5, 0.0]]
    assert rewards.length(mask, 4).tolist() == [0.25]


def test_combine_weights_named_components():
    comps = {"teacher_loglik": torch.tensor([-1.0, -2.0]), "length": torch.tensor([0.5, 1.0])}
    total = rewards.combine(comps, {"teacher_loglik": 1.0, "length": -0.5})
    assert total.tolist() == [-1.25, -2.5]
    assert rewards.combine(comps, {"teacher_loglik": 2.0, "length": 0.0}).tolist() == [-2.0, -4.0]
    summary = rewards.summarize(comps)
    assert summary == {"reward/teacher_loglik": -1.5, "reward/length": 0.75}


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"teacher_logik": 1.0}, "not available"),  # the config's rules name the misspelt component first
        ({"inverse_loss": 1.0}, "not available"),
        ({"teacher_loglik": 0.0}, "every reward weight is zero"),
    ],
)
def test_combine_rejects_bad_weights(weights, message):
    with pytest.raises(GrpoKdError, match=message):
        rewards.combine({"teacher_loglik": torch.zeros(2)}, weights)
