"""m draws from the teacher per token: the unbiased sparse estimate of the teacher the cache stores beside its top-k.

    ids, weights, logprobs = sample_teacher(hidden, weight, bias, m, temperature=1.0, softcap=None, seed=7)

Why both: the top-k alone is a biased estimate of the teacher (it drops the tail). m draws with weight count/m
give E[w_v] = p(v) for every v ("Sparse Logit Sampling", ACL 2025), so the forward KL estimated from them,
sum_j w_j (log p_j - log q_j), has the exact gradient q - p in expectation (`linear_sparse_kl` with
`teacher_weights`). That estimate needs the teacher's own log-prob at each drawn id, hence `logprobs`: the
teacher's full-vocabulary-normalised log-probs (at the cache's temperature and softcap), gathered in float32
from the same logits the draws came from. Padding slots (id 0, weight 0) hold the log-prob of id 0, so every
slot's log-prob is what the teacher says about its id.

Logits exist for one row chunk at a time (at most `chunk_bytes` of float32), never for all N rows.
"""

from __future__ import annotations

import numpy as np
import torch

from grpo_kd.kernels._common import row_chunks, transform_logits


@torch.no_grad()
def sample_teacher(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int, *,
                   temperature: float, softcap: float | None, seed: int,
                   chunk_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m draws (with replacement) per row of hidden (N, H) -> ids [N, m] int32, weights [N, m] float32,
    log-probs [N, m] float32.

    The distinct drawn ids come first, by count (descending); weight = count / m; unused slots hold id 0,
    weight 0. `seed` fixes the draws (a torch.Generator on hidden's device).
    """
    generator = torch.Generator(device=hidden.device).manual_seed(seed)
    ids_out, weights_out, logprobs_out = [], [], []
    for rows in row_chunks(hidden.shape[0], weight.shape[0], chunk_bytes // 2):
        logits = hidden[rows].float() @ weight.float().T  # (n, V)
        if bias is not None:
            logits = logits + bias.float()
        logp = torch.log_softmax(transform_logits(logits, temperature, softcap), dim=-1)  # (n, V)
        draws = torch.multinomial(logp.exp(), m, replacement=True, generator=generator)  # (n, m)
        counts = torch.zeros_like(logp).scatter_add_(1, draws, torch.ones_like(draws, dtype=logp.dtype))  # (n, V)
        top_counts, top_ids = counts.topk(m, dim=-1)  # (n, m)
        ids = torch.where(top_counts > 0, top_ids, 0)  # (n, m)
        ids_out.append(ids.to(torch.int32).cpu())
        weights_out.append((top_counts / m).float().cpu())
        logprobs_out.append(logp.gather(1, ids).float().cpu())  # (n, m)
    if not ids_out:
        return np.zeros((0, m), np.int32), np.zeros((0, m), np.float32), np.zeros((0, m), np.float32)
    return torch.cat(ids_out).numpy(), torch.cat(weights_out).numpy(), torch.cat(logprobs_out).numpy()
