"""Self-distillation with the inverse-loss reward: the student learns what its own frozen base finds likely.

    r_i = -mean_t NLL_base(y_t | y_<t) = mean_t log p_base(y_t | y_<t)          ("inverse_loss")
    A_i = group-relative advantage of r_i;   L = clipped surrogate + beta * k3(q_theta, q_ref)

The base log-probs come from the teacher cache when the teacher is the student's base (`teacher.kind:
self_base`, its `teacher_logprobs`); otherwise they are the reference log-probs (the cache's, or computed live
with the adapters off), since the reference of a LoRA student is its frozen base. With beta = 0 nothing holds the
policy near the base and the reward alone drives it to collapse onto its most likely continuations; beta > 0
is the guard (docs/experiments.md).
"""

from __future__ import annotations

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.train.algorithms.common import Context, Prepared, completion_forward, policy_loss, reward_components
from grpo_kd.train.algorithms.grpo import advantages_from

NEEDS_TOKEN_LEVEL = False
NEEDS_VALUE_HEAD = False


def base_logprobs(batch: CacheBatch, cfg: Config, ctx: Context) -> torch.Tensor:
    """(B, T) log-probs of the completion under the frozen base."""
    if cfg.teacher.kind == "self_base" and batch.teacher_logprobs is not None:
        return batch.teacher_logprobs
    if batch.ref_logprobs is not None:
        return batch.ref_logprobs
    if ctx.reference is None:
        raise GrpoKdError("self_distill needs the base's log-probs: a self_base teacher cache, cached reference "
                          "log-probs, or a live reference")
    return ctx.reference(batch)


def prepare(batch: CacheBatch, cfg: Config, ctx: Context) -> Prepared:
    components = reward_components(batch, cfg, base_logprobs=base_logprobs(batch, cfg, ctx))
    return advantages_from(components, batch, cfg)


def micro_loss(micro: CacheBatch, prepared: Prepared, cfg: Config, ctx: Context):
    def loss(hidden, _values):  # hidden (B, T, H), inside the wrapped forward
        return policy_loss(hidden, micro, prepared.advantages, cfg, ctx)

    return completion_forward(micro, ctx, loss)
