"""Named reward components and their weighted sum.

Every component is a pure function of cached quantities (teacher log-probs, reference or base log-probs, the
student's behaviour log-probs, lengths), so that an ablation of components reruns on the very same cached
rollouts: change `loss.reward.weights`, not the cache. Components are logged separately under `reward/<name>`.

Sequence-level components return `[B]`, token-level ones `[B, T]` (zero on padding); their names are listed
in `grpo_kd.config.REWARD_COMPONENTS`, which the config's rules check `loss.reward.weights` against.
log p_T(y_t | y_<t) is the cache's per-token teacher value: exact with one vocabulary; with a teacher of another
tokenizer the log-prob of the teacher tokens that end inside y_t's bytes (grpo_kd/xtok.py), which sums to the
teacher's log-likelihood of the completion, so the same components serve both:

    teacher_loglik   r_i = mean_t log p_T(y_t | y_<t)
    teacher_logprob  r_t = log p_T(y_t | y_<t)                                 (per token; PPO's per-token reward,
                                                                              teacher_loglik paid at every token)
    log_ratio        r_t = log p_T(y_t | y_<t) - log q_theta(y_t | y_<t)       (per token; MiniLLM, PPO)
    inverse_loss     r_i = -mean_t NLL_base(y_t | y_<t) = mean_t log p_base    (self-distillation)
    length           r_i = completion length / max_new_tokens                  (a length term, usually negative weight)
"""

from __future__ import annotations

from typing import Mapping

import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.train.advantages import masked_mean


def teacher_loglik(teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean teacher log-prob of the student's tokens, `[B, T]` -> `[B]`."""
    return masked_mean(teacher_logprobs.float(), mask, dim=1)


def teacher_logprob(teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p_T of the student's tokens, `[B, T]`, zero on padding (its mean over t is teacher_loglik)."""
    return teacher_logprobs.float() * mask


def log_ratio(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p_T - log q_theta, `[B, T]`, zero on padding."""
    return (teacher_logprobs.float() - student_logprobs.float()) * mask


def inverse_loss(base_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Self-distillation reward: minus the mean NLL of the completion under the frozen base, `[B]`."""
    return masked_mean(base_logprobs.float(), mask, dim=1)


def length(mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Completion length as a fraction of the limit, `[B]`."""
    return mask.float().sum(dim=1) / max(max_new_tokens, 1)


def combine(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum of the named components that have a weight; every weighted name must be present.

    Sequence components (`[B]`) and token components (`[B, T]`) do not mix: combine each kind separately.
    """
    missing = sorted(name for name, w in weights.items() if w and name not in components)
    if missing:
        raise GrpoKdError(
            f"reward component(s) {', '.join(missing)} are weighted but not available for this algorithm and cache"
        )
    used = [name for name, w in weights.items() if w]
    if not used:
        raise GrpoKdError("every reward weight is zero: nothing to learn from")
    shapes = {components[name].shape for name in used}
    if len(shapes) > 1:
        raise GrpoKdError(f"reward components {', '.join(used)} have different shapes {sorted(map(tuple, shapes))}")
    return sum(weights[name] * components[name].float() for name in used)


def summarize(components: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, float]:
    """Batch means of each component for the metrics log, as `reward/<name>`."""
    out = {}
    for name, value in components.items():
        if value.ndim == 2 and mask is not None:
            out[f"reward/{name}"] = float(masked_mean(value, mask))
        else:
            out[f"reward/{name}"] = float(value.float().mean())
    return out
