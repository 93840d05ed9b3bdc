"""`linear_grpo_loss`: TRL's GRPO clipped surrogate, from hidden states, without full-vocabulary logits.

With per-token log-probs logp = log q(y_bt) from the fused engine, a mask m_bt, advantages A (per sequence
[B] broadcast over T, or per token [B, T]) and old log-probs (None: the current ones, detached):

    log_ratio_bt = logp_bt - old_bt
    log_w        = log_ratio_bt                                  (importance_sampling_level="token")
                 = sum_t m_bt log_ratio_bt / max(1, sum_t m_bt)  ("sequence", one weight per sequence, GSPO)
    r            = exp(log_w)
    loss_bt      = -min(r A_bt, clip(r, 1 - eps_low, 1 + eps_high) A_bt) + beta * k3_bt
    k3_bt        = exp(ref_bt - logp_bt) - (ref_bt - logp_bt) - 1

aggregated as in TRL's GRPOTrainer:

    "grpo"    mean_b [ sum_t m_bt loss_bt / max(1, sum_t m_bt) ]
    "bnpo"    sum_bt m_bt loss_bt / max(1, sum_bt m_bt)
    "dr_grpo" sum_bt m_bt loss_bt / (B * max_completion_length)       (T when None)
    "dapo"    sum_bt m_bt loss_bt / max(1, sum_bt m_bt)                (the token count of this process's batch;
              TRL divides by the global count over processes — scale by world size in a distributed loop)

The gradient w.r.t. the logits of token (b, t) is  d loss / d logp_bt * (onehot(y_bt) - q_bt)  (plus the
k3 term), which engine.py applies without materialising q.

Key design choice: only the log-probs go through the fused engine; the surrogate itself is plain torch over
[B, T] (cheap), so it reads like TRL's code and stays exactly equal to it. Masked tokens are dropped before the
vocabulary sweep, so padding costs nothing.
"""

from __future__ import annotations

import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels._common import check_ids, make_options, prepare_linear
from grpo_kd.kernels.engine import StatsOptions, linear_stats

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


def _check_bt(t: torch.Tensor | None, shape: tuple[int, int], name: str) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise GrpoKdError(f"{name} must be a tensor of shape [B, T]={list(shape)}, got {getattr(t, 'shape', t)}")
    return t


def _check_options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, max_completion_length):
    if loss_type not in LOSS_TYPES:
        raise GrpoKdError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise GrpoKdError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if not 0 <= epsilon_low < 1 or epsilon_high < 0:
        raise GrpoKdError(f"epsilon_low must be in [0, 1) and epsilon_high >= 0, got {epsilon_low}, {epsilon_high}")
    if max_completion_length is not None and max_completion_length <= 0:
        raise GrpoKdError(f"max_completion_length must be positive, got {max_completion_length}")


def _masked_batch_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's logging mean: over sequences when x is [B, 1] (sequence level), over unmasked tokens otherwise."""
    if x.shape[1] == 1:
        return x.float().mean() if x.numel() else x.new_zeros(())
    return (x.float() * mask).sum() / mask.sum().clamp(min=1.0)


def linear_grpo_loss(
    hidden: torch.Tensor,  # (B, T, H) or (B*T, H)
    weight: torch.Tensor,  # (V, H)
    token_ids: torch.Tensor,  # (B, T) sampled completion tokens
    mask: torch.Tensor,  # (B, T) 1 for completion tokens that count, 0 for padding
    advantages: torch.Tensor,  # (B,) per sequence or (B, T) per token
    *,
    old_logprobs: torch.Tensor | None = None,  # (B, T) behaviour log-probs; None: ratio 1 with logp's gradient
    ref_logprobs: torch.Tensor | None = None,  # (B, T) reference log-probs for the k3 penalty
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    bias: torch.Tensor | None = None,  # (V,)
    impl: str = "auto",
    softcap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics): the scalar loss (fp32) and detached fp32 scalars "clip_fraction", "clip_low",
    "clip_high", "ratio", "kl" (masked mean k3; 0 without ref_logprobs) and "entropy" (masked mean)."""
    _check_options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, max_completion_length)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        raise GrpoKdError(f"token_ids must be [B, T], got {getattr(token_ids, 'shape', token_ids)}")
    B, T = token_ids.shape
    hidden2, _, weight, bias = prepare_linear(hidden, weight, bias)
    if hidden2.shape[0] != B * T:
        raise GrpoKdError(f"hidden must be [B, T, H] with B*T={B * T} rows like token_ids, got {tuple(hidden.shape)}")
    mask = _check_bt(mask, (B, T), "mask")
    valid = mask != 0  # (B, T)
    m = mask.float()  # (B, T)
    if beta != 0.0 and ref_logprobs is None:
        raise GrpoKdError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
        got = getattr(advantages, "shape", advantages)
        raise GrpoKdError(f"advantages must be [B]={B} or [B, T]={[B, T]}, got {got}")
    ids = check_ids(token_ids, weight.shape[0], "token_ids", valid=valid)  # (B, T)

    opts = StatsOptions(make_options(temperature, softcap, impl, hidden2, weight), need_entropy=True)
    stats = linear_stats(hidden2, weight, bias, ids.reshape(-1, 1), opts, row_mask=valid.reshape(-1))
    logp = (stats.z_ids[:, 0] - stats.lse).reshape(B, T)  # (B, T); 0 where masked
    zero = torch.zeros_like(logp)

    # Sanitise what padding may hold (NaN, -inf) so that it cannot leak into the loss or its gradient.
    if old_logprobs is None:
        old = logp.detach()
    else:
        old = torch.where(valid, _check_bt(old_logprobs, (B, T), "old_logprobs").float(), zero)
    adv = advantages.float().unsqueeze(1) if advantages.dim() == 1 else torch.where(valid, advantages.float(), zero)

    log_ratio = logp - old  # (B, T)
    if importance_sampling_level == "token":
        log_w = log_ratio  # (B, T)
    else:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # (B, T) or (B, 1) broadcast to (B, T) below
    per_token_loss = per_token_loss.expand(B, T)

    kl = None
    if ref_logprobs is not None:
        ref = torch.where(valid, _check_bt(ref_logprobs, (B, T), "ref_logprobs").float(), zero)
        kl = torch.exp(ref - logp) - (ref - logp) - 1  # (B, T) k3 estimator of KL(q || ref)
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl

    masked_sum = (per_token_loss * m).sum()
    if loss_type == "grpo":
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = masked_sum / m.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = masked_sum / (B * (max_completion_length or T))

    with torch.no_grad():
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_low": _masked_batch_mean(low, m),
            "clip_high": _masked_batch_mean(high, m),
            "clip_fraction": _masked_batch_mean(low | high, m),
            "ratio": _masked_batch_mean(coef_1, m),
            "kl": _masked_batch_mean(kl, m) if kl is not None else logp.new_zeros(()),
            "entropy": _masked_batch_mean(-stats.eq_logq.reshape(B, T), m),
        }
    return loss, metrics
