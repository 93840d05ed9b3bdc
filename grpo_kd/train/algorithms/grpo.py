"""GRPO-KD: a teacher-scored sequence reward, group-relative advantages, TRL's clipped surrogate, k3 KL.

    r_i   = sum_c w_c r_c,i          named components (default: teacher_loglik = mean_t log p_T(y_t | y_<t));
                                     loss.reward.kind "minillm" defaults to log_ratio, averaged over the tokens
    A_i   = (r_i - mean_g r) / (std_g r + eps)        over the G completions of the prompt (std if scale_rewards)
    L     = surrogate(A, ratio = q_theta / q_old, clip eps_low/eps_high) + beta * k3(q_theta, q_ref)
            aggregated by loss.policy.loss_type over the whole optimizer step (common.py)
    (+ pt_weight * L_PT on pre-training text: the "MiniLLM-style" variant; added by the update loop)

The advantages depend only on cached quantities (teacher log-probs, behaviour log-probs, lengths), so they are the
same in every epoch, and an ablation of reward components reuses the cache unchanged.
"""

from __future__ import annotations

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import Config
from grpo_kd.train.advantages import group_advantages
from grpo_kd.train.algorithms.common import (
    Context,
    Prepared,
    completion_forward,
    group_size_of,
    policy_loss,
    reward_components,
    reward_weights,
    sequence_reward,
)

NEEDS_TOKEN_LEVEL = False
NEEDS_VALUE_HEAD = False


def prepare(batch: CacheBatch, cfg: Config, ctx: Context) -> Prepared:
    components = reward_components(batch, cfg)
    return advantages_from(components, batch, cfg)


def advantages_from(components: dict[str, torch.Tensor], batch: CacheBatch, cfg: Config) -> Prepared:
    """Weighted sequence reward -> group-relative advantages (shared with self_distill)."""
    mask = batch.completion_mask.float()  # (B, T)
    reward = sequence_reward(components, reward_weights(cfg), mask)  # (B,)
    advantages = group_advantages(reward, group_size_of(batch), scale=cfg.loss.grpo.scale_rewards)  # (B,)
    return Prepared(advantages=advantages, rewards={**components, "total": reward})


def micro_loss(micro: CacheBatch, prepared: Prepared, cfg: Config, ctx: Context):
    def loss(hidden, _values):  # hidden (B, T, H), inside the wrapped forward
        return policy_loss(hidden, micro, prepared.advantages, cfg, ctx)

    return completion_forward(micro, ctx, loss)
