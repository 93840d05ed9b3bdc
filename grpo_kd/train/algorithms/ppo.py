"""PPO with a value head and GAE over per-token rewards, with either reward (teacher log-likelihood or MiniLLM's).

    r_t   = sum_c w_c r_c,t      token components paid at every token: teacher_logprob = log p_T(y_t),
                                 log_ratio = log p_T(y_t) - log q_old(y_t) (MiniLLM-style; loss.reward.kind minillm);
                                 sequence components (teacher_loglik, length, ...) paid at the last token
            - beta (log q_old(y_t) - log q_ref(y_t))      with loss.ppo.kl_in_reward (classic RLHF PPO: the KL
                                 to the reference as a per-token reward penalty, k1 estimate; the loss has no KL term)
            every per-token term divided by the completion's length L with loss.ppo.length_normalize: the return
                                 from the first token (gamma = 1) is then the mean per token, as in GRPO's reward
    V_t   = value head on the hidden state that predicts y_t (the state before y_t), taken before any update
    A_t   = GAE(r, V; gamma, lambda),  returns R_t = A_t + V_t;  A whitened over the batch
    L     = clipped surrogate(A_t) + beta * k3(q_theta, q_ref)       (the k3 term only without kl_in_reward)
            + value_coef * 1/2 max((V_t - R_t)^2, (clip(V_t, V_old -+ eps) - R_t)^2)   (token mean over the step)

So `loss.reward.weights: {teacher_loglik: 1}` (the default) pays the mean teacher log-prob once at the end,
`{teacher_logprob: 1}` pays each token's teacher log-prob at that token, and `loss.reward.kind: minillm` pays
log p_T - log q at every token (with loss.pt.weight > 0: the MiniLLM-style reward plus L_PT). q_old is the
student at sampling time (not the teacher-mixed sampling distribution).

The value head is a float32 linear layer on the student's final hidden state, trained with the policy and saved
beside the weights in the checkpoint (`model/value_head.safetensors`).
"""

from __future__ import annotations

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.train.advantages import gae, whiten
from grpo_kd.train.algorithms.common import (
    Context,
    Prepared,
    behaviour_student_logprobs,
    completion_forward,
    policy_loss,
    reward_components,
    reward_weights,
    take_rows,
    token_reward,
    token_sum_scale,
)

NEEDS_TOKEN_LEVEL = False
NEEDS_VALUE_HEAD = True


@torch.no_grad()
def old_values(batch: CacheBatch, cfg: Config, ctx: Context) -> torch.Tensor:
    """(B, T) values of the current value head, computed in micro-batches without gradients."""
    bare = getattr(ctx.module, "module", ctx.module)
    step = max(cfg.optim.micro_batch_size, 1)
    B, T = batch.completion_ids.shape
    out = torch.zeros(B, T)
    for start in range(0, B, step):
        rows = list(range(start, min(start + step, B)))
        micro = take_rows(batch, rows)
        _, values = bare(micro.input_ids, micro.attention_mask, micro.prompt_lengths, micro.completion_ids.shape[1])
        out[start : start + len(rows), : values.shape[1]] = values.float().cpu()
    return out * batch.completion_mask.float()


@torch.no_grad()
def reference_logprobs(batch: CacheBatch, cfg: Config, ctx: Context) -> torch.Tensor:
    """(B, T) reference log-probs of the sampled tokens: the cache's, else live in micro-batches."""
    if batch.ref_logprobs is not None:
        return batch.ref_logprobs.float()
    if ctx.reference is None:
        raise GrpoKdError("loss.ppo.kl_in_reward needs reference log-probs: the cache has none (teacher.reference) "
                          "and no live reference is set")
    step = max(cfg.optim.micro_batch_size, 1)
    B, T = batch.completion_ids.shape
    out = torch.zeros(B, T)
    for start in range(0, B, step):
        micro = take_rows(batch, list(range(start, min(start + step, B))))
        ref = ctx.reference(micro).float().cpu()  # (b, T')
        out[start : start + ref.shape[0], : ref.shape[1]] = ref
    return out


def kl_penalty(batch: CacheBatch, cfg: Config, ctx: Context) -> torch.Tensor:
    """(B, T) -beta (log q_old - log q_ref) per token, 0 on padding: the KL to the reference as a reward."""
    mask = batch.completion_mask.float()
    behaviour = behaviour_student_logprobs(batch).float()
    return -cfg.loss.policy.beta * (behaviour - reference_logprobs(batch, cfg, ctx)) * mask


def prepare(batch: CacheBatch, cfg: Config, ctx: Context) -> Prepared:
    mask = batch.completion_mask.float()  # (B, T)
    components = reward_components(batch, cfg)
    if cfg.loss.ppo.kl_in_reward and cfg.loss.policy.beta != 0.0:
        components["kl_penalty"] = kl_penalty(batch, cfg, ctx)  # (B, T)
    paid = dict(components)
    if cfg.loss.ppo.length_normalize:  # a token component's sum over the completion becomes its mean
        lengths = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        paid = {k: v / lengths if v.ndim == 2 else v for k, v in components.items()}
    weights = {**reward_weights(cfg), **({"kl_penalty": 1.0} if "kl_penalty" in paid else {})}
    rewards = token_reward(paid, weights, mask)  # (B, T)
    values = old_values(batch, cfg, ctx)  # (B, T)
    advantages, returns = gae(rewards, values, mask, gamma=cfg.loss.ppo.gamma, lam=cfg.loss.ppo.gae_lambda)  # (B, T)
    advantages = whiten(advantages, mask)
    return Prepared(advantages=advantages, rewards={**components, "total": rewards}, returns=returns,
                    old_values=values)


def value_loss(values: torch.Tensor, prepared: Prepared, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Sum over tokens of PPO's clipped value loss, (B, T) -> scalar."""
    old = prepared.old_values.to(values.device)
    returns = prepared.returns.to(values.device)
    clipped = old + (values - old).clamp(-epsilon, epsilon)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)  # (B, T)
    return (per_token * mask).sum()


def micro_loss(micro: CacheBatch, prepared: Prepared, cfg: Config, ctx: Context):
    def loss_fn(hidden, values):  # (B, T, H), (B, T), inside the wrapped forward
        loss, metrics = policy_loss(hidden, micro, prepared.advantages, cfg, ctx)
        mask = micro.completion_mask.float().to(values.device)
        v_loss = value_loss(values.float(), prepared, mask, cfg.loss.policy.epsilon_low) * token_sum_scale(ctx.norm)
        metrics["value_loss"] = v_loss.detach() / token_sum_scale(ctx.norm) / mask.sum().clamp(min=1)
        return loss + cfg.loss.ppo.value_coef * v_loss, metrics

    return completion_forward(micro, ctx, loss_fn)
