"""The privileged-information self-teacher: token-level reverse KL to the student itself, shown the answer.

    L = 1/N sum_{b,t} KL( q_theta(. | x, y_<t) || p_priv(. | x_priv, y_<t) )           over the step's N tokens

on the student's own rollouts y (on-policy, so the KL's sampling distribution is the student's); p_priv is the
student with the privileged information (answer, demonstration, feedback) in its prompt, scored by the
cache-teacher pass (`teacher.kind: self_privileged`) into the top-k cache, and the KL is taken over the k
cached ids plus a "rest" bucket (`loss.teacher_kl.tail`) by `linear_sparse_kl` — no full-vocabulary logits. The reverse
direction is mode-seeking: the student concentrates on what the informed self would say.
With `loss.teacher_kl.estimate=sampled` (and `loss.teacher_kl.divergence=forward`) the KL is instead the unbiased forward-KL
estimate from the cache's m samples of the informed self (`common.teacher_kl`).
"""

from __future__ import annotations

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import Config
from grpo_kd.train.algorithms.common import (
    Context,
    Prepared,
    check_teacher_estimate,
    completion_forward,
    reward_components,
    teacher_kl,
)

NEEDS_TOKEN_LEVEL = True
NEEDS_VALUE_HEAD = False


def prepare(batch: CacheBatch, cfg: Config, ctx: Context) -> Prepared:
    """No advantages: the loss is a divergence, not a policy gradient. Rewards are only logged."""
    check_teacher_estimate(batch, cfg)
    B = batch.completion_ids.shape[0]
    return Prepared(advantages=torch.zeros(B), rewards=reward_components(batch, cfg))


def micro_loss(micro: CacheBatch, prepared: Prepared, cfg: Config, ctx: Context):
    return completion_forward(micro, ctx, lambda hidden, _values: teacher_kl(hidden, micro, cfg, ctx))
