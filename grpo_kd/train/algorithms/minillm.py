"""MiniLLM's policy gradient for the reverse KL (Gu et al., 2024), from the cached top-k.

With r_t = log p_T(y_t | y_<t) - log q_theta(y_t | y_<t) (q_theta: the student at sampling time), the gradient of
KL(q_theta || p_T) splits into

    single step   sum_t w_t grad KL( q_theta(. | y_<t) || p_T(. | y_<t) )        exact at each position, over the
                                                                                 cached top-k + a rest bucket
                                                                                 (`linear_sparse_kl`, loss.teacher_kl.tail)
    long term     -sum_t w_t A_t grad log q_theta(y_t | y_<t),   A_t = whiten(R_t) over the prepared batch,
                  R_t = 1/(L-t) sum_{t'>=t} gamma^{t'-t} r_t'       (the reference implementation, LMOps)

R_t includes the current step's reward and A_t is whitened, as in LMOps: eq. 7's R^Norm_{t+1} taken literally (no
baseline, `loss.minillm.include_current: false, whiten: false`) is 0 after the last token and -KL on average
before it, which rewards stopping early (docs/experiments.md, "MiniLLM's long-term return").
Teacher-mixed sampling draws y from p~ = alpha p_T + (1 - alpha) q_theta, and w_t = q_theta(y_t) / p~(y_t) corrects
for it. The long-term term is the clipped surrogate with advantages A_t and the recorded
behaviour (mixture) log-probs as old log-probs, its ratio clipped at loss.minillm.importance_clip; the single-step term
is weighted by w_t = clip(q_old(y_t) / p~(y_t), 1 -+ importance_clip) from the recorded log-probs (1 without
mixing). Plus pt_weight * L_PT (added by the update loop); MiniLLM's objective has no KL to a reference, so
loss.policy.beta defaults to 0 for it (schema.ALGORITHM_DEFAULTS), and beta * k3 is added only when set.
`loss.teacher_kl.estimate=sampled` swaps the single-step term for the unbiased forward-KL estimate from the cached
teacher samples (`loss.teacher_kl.divergence=forward` then; MiniLLM's own choice is the reverse KL over the top-k).
"""

from __future__ import annotations

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import Config
from grpo_kd.train.advantages import normalized_future_rewards, whiten
from grpo_kd.train.algorithms.common import (
    Context,
    Prepared,
    check_teacher_estimate,
    completion_forward,
    policy_loss,
    reward_components,
    teacher_kl,
)

NEEDS_TOKEN_LEVEL = True
NEEDS_VALUE_HEAD = False


def importance_weights(batch: CacheBatch, clip: float) -> torch.Tensor:
    """(B, T) clipped q_theta / p~ of the sampled tokens; ones when sampling was not teacher-mixed."""
    mask = batch.completion_mask.float()
    if batch.student_logprobs is None:
        return mask
    ratio = torch.exp(batch.student_logprobs.float() - batch.old_logprobs.float())
    return ratio.clamp(1 - clip, 1 + clip) * mask


def prepare(batch: CacheBatch, cfg: Config, ctx: Context) -> Prepared:
    check_teacher_estimate(batch, cfg)
    mask = batch.completion_mask.float()  # (B, T)
    components = reward_components(batch, cfg)  # log_ratio (B, T) among them
    m = cfg.loss.minillm
    returns = normalized_future_rewards(components["log_ratio"], mask, gamma=m.gamma,
                                        length_normalize=m.length_normalize,
                                        include_current=m.include_current)  # (B, T): R_t
    advantages = whiten(returns, mask) if m.whiten else returns  # (B, T)
    weights = importance_weights(batch, cfg.loss.minillm.importance_clip)
    return Prepared(advantages=advantages, rewards=components, token_weights=weights)


def micro_loss(micro: CacheBatch, prepared: Prepared, cfg: Config, ctx: Context):
    def loss(hidden, _values):  # hidden (B, T, H), inside the wrapped forward
        long_term, metrics = policy_loss(hidden, micro, prepared.advantages, cfg, ctx,
                                         epsilon=cfg.loss.minillm.importance_clip)
        single_step, kl_metrics = teacher_kl(hidden, micro, cfg, ctx, token_weights=prepared.token_weights)
        return long_term + single_step, {**metrics, **kl_metrics}

    return completion_forward(micro, ctx, loss)
