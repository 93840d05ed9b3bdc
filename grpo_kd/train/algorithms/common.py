"""What the algorithm files share: step normalisers, batch slicing, reward assembly and the three loss terms.

An algorithm is a module (grpo.py, ppo.py, minillm.py, self_distill.py, privileged.py), not a class, that
satisfies the `Algorithm` protocol of `grpo_kd.train.algorithms`: NEEDS_TOKEN_LEVEL, NEEDS_VALUE_HEAD,
`prepare(batch, cfg, ctx) -> Prepared` (once per iteration, no grad) and `micro_loss(micro, prepared, cfg, ctx)`.

Loss normalisation. One optimizer step sees a global batch of S sequences with N completion tokens spread over
`world_size` ranks x `grad_accum` micro-batches. DDP averages gradients over ranks, so every micro-batch loss is
multiplied by `world_size` and divided by a normaliser of the *whole step*, never of the micro-batch:

    loss_type "grpo", "dr_grpo"    the kernel's micro loss x B_micro / S      (it averages over its B_micro rows;
                                   dr_grpo divides by B x rollout.max_new_tokens, a constant)
    loss_type "bnpo", "dapo"       the kernel's micro loss x N_micro / N      (it averages over its N_micro tokens)
    token means (KL to a teacher, value loss)      sum over the micro's tokens / N
    L_PT                                            sum of NLL over the micro's tokens / (PT tokens of the step)

so that the accumulated gradient is exactly that of one big batch (tests/train/test_algorithms.py
`test_micro_batches_sum_to_the_whole_batch`, tests/train/test_update.py `test_micro_batches_times_accumulation_...`
and `test_two_processes_equal_one_process`).
"bnpo" and "dapo" therefore coincide here: both divide by the token count of the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels import linear_grpo_loss
from grpo_kd.models import lm_head
from grpo_kd.train import rewards as R
from grpo_kd.train.advantages import masked_mean


@dataclass(frozen=True)
class StepNorm:
    """Counts of the whole optimizer step (all ranks, all micro-batches): the loss normalisers."""

    sequences: int  # S: completions
    tokens: int  # N: completion tokens
    world_size: int = 1


@dataclass
class Context:
    """What a loss needs besides the batch. `module` may be DDP-wrapped; `policy` is the bare student."""

    module: torch.nn.Module  # TrainModule: (input_ids, attention_mask, prompt_lengths, T) -> (hidden, values)
    policy: torch.nn.Module  # the student: its LM head, its adapters
    reference: Callable[[CacheBatch], torch.Tensor] | None = None  # live (B, T) reference log-probs, no grad
    norm: StepNorm | None = None  # set by the loop before each step's micro-batches
    impl: str = "auto"
    temperature: float = 1.0  # the rollout's sampling temperature: behaviour log-probs were taken at it


class Prepared(NamedTuple):
    """Per-row results of `prepare`, aligned with the batch rows (B) and its completion width (T)."""

    advantages: torch.Tensor  # (B,) per sequence or (B, T) per token
    rewards: dict[str, torch.Tensor]  # named components for the log: (B,) or (B, T)
    token_weights: torch.Tensor | None = None  # (B, T) MiniLLM's clipped importance weights
    returns: torch.Tensor | None = None  # (B, T) PPO value targets
    old_values: torch.Tensor | None = None  # (B, T) PPO values of the behaviour policy


# ---------------------------------------------------------------------------------------------- slicing


def _fit(t: torch.Tensor, T: int) -> torch.Tensor:
    """Trim or zero-pad dim 1 of a (B, T', ...) tensor to T."""
    if t.ndim < 2 or t.shape[1] == T:
        return t
    if t.shape[1] > T:
        return t[:, :T]
    pad = t.new_zeros((t.shape[0], T - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def take_rows(batch: CacheBatch, rows: torch.Tensor | list[int]) -> CacheBatch:
    """Rows `rows` of `batch`, with the padding trimmed to their longest sequence and completion."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    L = int(batch.attention_mask[rows].sum(1).max().item()) if len(rows) else 0
    T = int(batch.completion_mask[rows].sum(1).max().item()) if len(rows) else 0
    T = max(T, 1)
    out = {}
    for name, value in batch._asdict().items():
        if value is None:
            out[name] = None
            continue
        value = value[rows]
        if name in ("input_ids", "attention_mask"):
            value = value[:, : max(L, 1)]
        elif value.ndim >= 2:
            value = _fit(value, T)
        out[name] = value
    return CacheBatch(**out)


def to_device(item, device: torch.device | str):
    """A CacheBatch or Prepared with every tensor (also inside `rewards`) on `device`."""
    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    return type(item)(*(move(v) for v in item))


def take_prepared(prepared: Prepared, rows: torch.Tensor | list[int], T: int) -> Prepared:
    rows = torch.as_tensor(rows, dtype=torch.long)

    def pick(t):
        return None if t is None else _fit(t[rows], T)

    return Prepared(
        advantages=pick(prepared.advantages),
        rewards={k: pick(v) for k, v in prepared.rewards.items()},
        token_weights=pick(prepared.token_weights),
        returns=pick(prepared.returns),
        old_values=pick(prepared.old_values),
    )


def concat_prepared(parts: list[Prepared]) -> Prepared:
    """Stack per-group results (each with its own T) into one, zero-padded to the longest."""
    T = max(p.advantages.shape[1] if p.advantages.ndim == 2 else 1 for p in parts)
    T = max([T] + [v.shape[1] for p in parts for v in p.rewards.values() if v.ndim == 2])

    def cat(values):
        if values[0] is None:
            return None
        return torch.cat([_fit(v, T) for v in values], dim=0)

    return Prepared(
        advantages=cat([p.advantages for p in parts]),
        rewards={k: cat([p.rewards[k] for p in parts]) for k in parts[0].rewards},
        token_weights=cat([p.token_weights for p in parts]),
        returns=cat([p.returns for p in parts]),
        old_values=cat([p.old_values for p in parts]),
    )


def split_groups(prepared: Prepared, group_ids: torch.Tensor) -> list[Prepared]:
    """Cut a prepared batch of whole groups back into one Prepared per group (rows with equal ids are adjacent)."""
    cuts = (torch.nonzero(group_ids[1:] != group_ids[:-1]).flatten() + 1).tolist()
    bounds = list(zip([0] + cuts, cuts + [len(group_ids)]))
    return [take_prepared(prepared, list(range(a, b)), _width(prepared)) for a, b in bounds]


def _width(prepared: Prepared) -> int:
    widths = [v.shape[1] for v in (prepared.advantages, *prepared.rewards.values()) if v.ndim == 2]
    return max(widths, default=1)


# ---------------------------------------------------------------------------------------------- rewards


def group_size_of(batch: CacheBatch) -> int:
    """G of a batch of whole groups; every group must have the same size for group-relative advantages."""
    _, counts = torch.unique_consecutive(batch.group_ids, return_counts=True)
    if len(set(counts.tolist())) != 1:
        raise GrpoKdError(f"groups of unequal sizes {sorted(set(counts.tolist()))} in one batch; the rollout "
                          "store must hold G completions per prompt")
    return int(counts[0])


def reward_weights(cfg: Config) -> dict[str, float]:
    """`loss.reward.weights`, or the algorithm's default when it is empty (the one place that default lives)."""
    if cfg.loss.reward.weights:
        return dict(cfg.loss.reward.weights)
    if cfg.loss.algorithm == "self_distill":
        return {"inverse_loss": 1.0}
    return {"log_ratio": 1.0} if cfg.loss.reward.kind == "minillm" else {"teacher_loglik": 1.0}


def behaviour_student_logprobs(batch: CacheBatch) -> torch.Tensor:
    """The student's own log-probs of its sampled tokens (not the teacher-mixed sampling distribution's)."""
    return batch.student_logprobs if batch.student_logprobs is not None else batch.old_logprobs


def reward_components(
    batch: CacheBatch, cfg: Config, *, base_logprobs: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Every reward component this batch and cache allow, by name (see grpo_kd.train.rewards). The teacher's
    per-token log-probs are those of the student's tokens: exact with one vocabulary, aligned by bytes with another
    (the cache's `target_logprobs` either way), so every component reads them the same way."""
    mask = batch.completion_mask.float()  # (B, T)
    out = {"length": R.length(mask, cfg.rollout.max_new_tokens)}  # (B,)
    if batch.teacher_logprobs is not None:
        out["teacher_loglik"] = R.teacher_loglik(batch.teacher_logprobs, mask)  # (B,)
        out["teacher_logprob"] = R.teacher_logprob(batch.teacher_logprobs, mask)  # (B, T)
        out["log_ratio"] = R.log_ratio(batch.teacher_logprobs, behaviour_student_logprobs(batch), mask)  # (B, T)
    if base_logprobs is not None:
        out["inverse_loss"] = R.inverse_loss(base_logprobs, mask)  # (B,)
    return out


def sequence_reward(components: dict[str, torch.Tensor], weights: dict[str, float], mask: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the components as one reward per sequence, `[B]`; token components are averaged."""
    seq = {k: masked_mean(v, mask, dim=1) if v.ndim == 2 else v for k, v in components.items()}
    return R.combine(seq, weights)


def token_reward(components: dict[str, torch.Tensor], weights: dict[str, float], mask: torch.Tensor) -> torch.Tensor:
    """Weighted sum as per-token rewards, `[B, T]`; a sequence component is paid at the last real token."""
    mask = mask.float()
    last = mask * (mask.cumsum(1) == mask.sum(1, keepdim=True)).float()  # (B, T) one-hot of the last token
    tok = {k: v.float() * mask if v.ndim == 2 else v.float()[:, None] * last for k, v in components.items()}
    return R.combine(tok, weights)


# ---------------------------------------------------------------------------------------------- loss terms


def completion_forward(micro: CacheBatch, ctx: Context, loss_fn: Callable | None = None):
    """(hidden (B, T, H), values (B, T) | None) at the positions that predict each completion token; with
    `loss_fn(hidden, values) -> (loss, metrics)` its result, computed inside the (DDP/FSDP-wrapped) forward,
    where the LM head is whole also under FSDP (distributed.py). Algorithms compute their loss this way."""
    return ctx.module(micro.input_ids, micro.attention_mask, micro.prompt_lengths, micro.completion_ids.shape[1],
                      loss_fn)


def reference_logprobs(micro: CacheBatch, cfg: Config, ctx: Context) -> torch.Tensor | None:
    """(B, T) reference log-probs: the cache's when it has them, else live (only when the KL term needs them)."""
    if micro.ref_logprobs is not None:
        return micro.ref_logprobs
    if cfg.loss.loss_kl_beta == 0.0:
        return None
    if ctx.reference is None:
        raise GrpoKdError("loss.policy.beta > 0 needs reference log-probs: the cache has none and no live reference "
                          "is set")
    return ctx.reference(micro).to(micro.old_logprobs.device)


def with_live_reference(micro: CacheBatch, cfg: Config, ctx: Context) -> CacheBatch:
    """`micro` with live reference log-probs filled in when the KL term needs them and the cache has none.
    The update loop calls it before the wrapped forward: a forward inside the forward would confuse FSDP."""
    if micro.ref_logprobs is not None or cfg.loss.loss_kl_beta == 0.0 or ctx.reference is None:
        return micro
    return micro._replace(ref_logprobs=ctx.reference(micro).to(micro.old_logprobs.device))


def policy_loss(
    hidden: torch.Tensor, micro: CacheBatch, advantages: torch.Tensor, cfg: Config, ctx: Context,
    *, epsilon: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + beta * k3 KL to the reference (`linear_grpo_loss`), scaled to the whole step; beta is
    `loss.loss_kl_beta` (0 where PPO pays the KL in its reward instead).

    hidden (B, T, H); advantages (B,) or (B, T); old log-probs are the recorded behaviour log-probs. With
    `loss.policy.tis_cap` and rollouts sampled by another engine, advantages carry the truncated importance weights
    (`tis_weights`).
    """
    head = lm_head(ctx.policy)
    policy = cfg.loss.policy
    mask = micro.completion_mask.float()  # (B, T)
    weights = tis_weights(micro, policy.tis_cap)  # (B, T) | None
    if weights is not None:
        per_token = advantages[:, None] if advantages.ndim == 1 else advantages  # (B, 1) or (B, T)
        advantages = per_token.to(weights) * weights  # (B, T)
    loss, metrics = linear_grpo_loss(
        hidden, head.weight, micro.completion_ids, mask, advantages,
        old_logprobs=micro.old_logprobs, ref_logprobs=reference_logprobs(micro, cfg, ctx), beta=cfg.loss.loss_kl_beta,
        epsilon_low=policy.epsilon_low if epsilon is None else epsilon,
        epsilon_high=policy.epsilon_high if epsilon is None else epsilon,
        loss_type=policy.loss_type, importance_sampling_level=policy.importance_sampling_level,
        temperature=ctx.temperature, max_completion_length=cfg.rollout.max_new_tokens,
        bias=head.bias, softcap=head.softcap, impl=ctx.impl,
    )  # fmt: skip
    if weights is not None:  # the mean truncated importance weight over the micro-batch's tokens
        metrics["tis_weight"] = weights.sum() / mask.sum().clamp(min=1.0)
    return loss * policy_scale(cfg.loss.policy.loss_type, micro, ctx.norm), metrics


def tis_weights(micro: CacheBatch, cap: float) -> torch.Tensor | None:
    """Truncated importance sampling for the sampler/trainer mismatch (Yao et al., 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"): the tokens were drawn from the engine's distribution
    mu (`sampler_logprobs`, vLLM's numerics) while the surrogate's ratio is taken against the trainer's own
    pi_old (`old_logprobs`), so each token's policy-gradient term gets the weight w = min(pi_old / mu, cap),
    (B, T), 0 on padding, no gradient. None when `cap` is 0 or the rollouts carry no sampler log-probs (the
    transformers engine, whose sampler is the trainer's own forward).

    Because w > 0, w * min(r A, clip(r) A) = min(r (w A), clip(r) (w A)): `policy_loss` applies w by passing
    the per-token advantages w * A to the kernel; the KL term is not weighted.
    """
    if cap <= 0 or micro.sampler_logprobs is None:
        return None
    old = micro.old_logprobs.float()  # (B, T)
    return torch.exp(old - micro.sampler_logprobs.to(old)).clamp(max=cap) * micro.completion_mask  # (B, T)


def policy_scale(loss_type: str, micro: CacheBatch, norm: StepNorm) -> float:
    """Turn the kernel's micro-batch average into this micro-batch's share of the step's average (module doc)."""
    if loss_type in ("grpo", "dr_grpo"):
        return norm.world_size * micro.completion_ids.shape[0] / max(norm.sequences, 1)
    tokens = max(int(micro.completion_mask.sum().item()), 1)
    return norm.world_size * tokens / max(norm.tokens, 1)


def token_sum_scale(norm: StepNorm) -> float:
    """Multiply a sum over a micro-batch's tokens by this to get its share of the step's token mean."""
    return norm.world_size / max(norm.tokens, 1)


def check_teacher_estimate(batch: CacheBatch, cfg: Config) -> None:
    """One clear line when `loss.teacher_kl.estimate` cannot be served by this cache and config (before training)."""
    if cfg.loss.teacher_kl.estimate == "topk":
        if batch.teacher_topk_ids is None:
            raise GrpoKdError(f"loss.algorithm={cfg.loss.algorithm} needs the teacher's top-k in the cache")
        return
    if batch.teacher_sample_ids is None or batch.teacher_sample_logprobs is None:
        raise GrpoKdError("loss.teacher_kl.estimate=sampled needs teacher samples in the cache, which has none: "
                          "re-run cache-teacher with teacher.num_samples > 0")


def teacher_kl(
    hidden: torch.Tensor, micro: CacheBatch, cfg: Config, ctx: Context, token_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_t w_t D(q_theta(.|y<t) || p_T(.|y<t)) / N from the cache (`linear_sparse_kl`), step-scaled.

    loss.teacher_kl.estimate "topk": D is `loss.teacher_kl.divergence` ("reverse" = KL(q || p)) over the cached top-k with the
    tail handling `loss.teacher_kl.tail`. "sampled": D is the forward KL estimated from the cached m teacher samples,
    sum_j w_j (log p_j - log q_j), whose gradient q - sum_j w_j e_j is q - p in expectation — the exact
    full-vocabulary forward-KL gradient, without top-k's bias. The student is taken at temperature 1 (its own
    distribution). token_weights (B, T), detached, default 1.
    """
    from grpo_kd.kernels import linear_sparse_kl

    check_teacher_estimate(micro, cfg)
    kl = cfg.loss.teacher_kl
    if kl.estimate == "sampled":
        ids, logprobs, weights = micro.teacher_sample_ids, micro.teacher_sample_logprobs, micro.teacher_sample_weights
    else:
        ids, logprobs, weights = micro.teacher_topk_ids, micro.teacher_topk_logprobs, None  # (B, T, k) each
    head = lm_head(ctx.policy)
    mask = micro.completion_mask.float()  # (B, T)
    per_token = linear_sparse_kl(
        hidden, head.weight, ids, logprobs, mask=mask, teacher_weights=weights,
        divergence=kl.divergence, beta=kl.jsd_beta, tail=kl.tail, bias=head.bias,
        softcap=head.softcap, reduction="none", impl=ctx.impl,
    )  # (B, T)  # fmt: skip
    weights = mask if token_weights is None else mask * token_weights
    loss = (per_token * weights).sum() * token_sum_scale(ctx.norm)
    return loss, {"teacher_kl": masked_mean(per_token.detach(), mask)}
