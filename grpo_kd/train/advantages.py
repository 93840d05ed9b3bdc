"""Advantages: group-relative (GRPO), generalised advantage estimation (PPO), and MiniLLM's normalised returns.

Pure functions over padded `[B, T]` tensors and a 0/1 `mask`; no model, no state. Every algorithm file of
`grpo_kd.train` builds its loss from these, so each formula is written and tested once.

Group-relative advantage (GRPO; the same formula as TRL's GRPOTrainer):

    A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)      (std unbiased; without scaling: no division)

GAE (PPO), per token t of one sequence with per-token rewards r_t and values V_t, V_{T} = 0 after the last token:

    delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lambda * A_{t+1},     returns_t = A_t + V_t

MiniLLM's length-normalised long-term return, for per-token rewards r_t of a completion of L tokens:

    include_current (the reference implementation, microsoft/LMOps minillm):
        R_t = 1 / (L - t) * sum_{t' = t}^{L-1} gamma^{t' - t} r_{t'}
    without it (Gu et al., 2024, eq. 7 read literally):
        R^Norm_{t+1} = 1 / (L - t - 1) * sum_{t' = t+1}^{L-1} gamma^{t' - t - 1} r_{t'}     (0 at the last token)

The divisor counts the rewards summed (not their discount weights), as LMOps does. minillm.py whitens the result
(docs/experiments.md, "MiniLLM's long-term return", says why both choices matter).
"""

from __future__ import annotations

import torch

from grpo_kd.errors import GrpoKdError


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalised advantages. `rewards` is `[B]` with consecutive groups of `group_size` samples."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise GrpoKdError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (num_groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (num_groups, G)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)  # (B,)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over unmasked entries; 0 (not NaN) where nothing is unmasked."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance over unmasked entries (PPO's advantage whitening)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded sequences. Returns `(advantages, returns)`, `[B, T]`."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = delta + gamma * lam * next_advantage
        advantages[:, t] = current * mask[:, t]
        # Padding keeps the running values of the last real token, so the recursion skips it.
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_advantage = torch.where(mask[:, t] > 0, current, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def normalized_future_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float, length_normalize: bool, include_current: bool
) -> torch.Tensor:
    """MiniLLM's long-term return per token (module doc): the (discounted) sum of the rewards from t on
    (`include_current`) or after t, divided by their count when `length_normalize`. `[B, T]`, 0 on padding."""
    rewards = rewards.float() * mask
    future = torch.zeros_like(rewards)  # (B, T): sum_{t' >= t} (or > t) gamma^{t'-t(-1)} r_t'
    running = torch.zeros_like(rewards[:, 0])  # (B,): the sum from t + 1 on
    for t in reversed(range(rewards.shape[1])):
        after = running
        running = rewards[:, t] + gamma * running
        future[:, t] = running if include_current else after
    if not length_normalize:
        return future * mask
    remaining = mask.flip(1).cumsum(1).flip(1)  # (B, T): unmasked tokens from t on, t included
    counted = remaining if include_current else remaining - mask
    return future / counted.clamp(min=1) * mask
