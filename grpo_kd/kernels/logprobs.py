"""`linear_logprobs`: per-token log-probabilities, log-sum-exp and entropy straight from hidden states.

    log q(y_n) = z_n[y_n] - lse_n,      lse_n = log sum_v exp(z_nv),      H_n = lse_n - sum_v q_nv z_nv

with z = transform(hidden @ weight.T + bias) as fixed in `_common.py`. Gradients w.r.t. the logits:

    d log q(y) / dz_v = onehot(y)_v - q_v,        d H / dz_v = -q_v (log q_v + H)

Key design choice: z[y] is a gathered dot product `hidden[n] . weight[y_n]` (no V sweep); the V sweep computes
only the row statistics (engine.py), so neither pass holds an N x V tensor.
"""

from __future__ import annotations

import torch

from grpo_kd.kernels._common import flatten_rows, make_options, prepare_linear, check_ids
from grpo_kd.kernels.engine import StatsOptions, linear_stats


def linear_logprobs(
    hidden: torch.Tensor,  # (N, H) or (B, T, H)
    weight: torch.Tensor,  # (V, H)
    token_ids: torch.Tensor,  # (N,) or (B, T), ints in [0, V)
    *,
    bias: torch.Tensor | None = None,  # (V,)
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprobs, lse, entropy | None), each fp32 with hidden's leading shape; differentiable w.r.t.
    hidden, weight and bias through all three outputs."""
    hidden2, lead, weight, bias = prepare_linear(hidden, weight, bias)
    ids = check_ids(flatten_rows(token_ids, lead, "token_ids"), weight.shape[0], "token_ids")  # (N,)
    opts = StatsOptions(make_options(temperature, softcap, impl, hidden2, weight), need_entropy=bool(return_entropy))
    stats = linear_stats(hidden2, weight, bias, ids.unsqueeze(1), opts)
    logprobs = stats.z_ids[:, 0] - stats.lse  # (N,)
    entropy = -stats.eq_logq.reshape(lead) if return_entropy else None
    return logprobs.reshape(lead), stats.lse.reshape(lead), entropy
