"""Float64 references for the kernel tests, written independently of grpo_kd.kernels.

They materialise the full [N, V] logits in float64 (fine for the tiny shapes of the tests) and follow the
textbook formulas, so that a shared mistake in the engine cannot hide behind them.
"""

from __future__ import annotations

import math

import torch


def ref_logits(hidden, weight, bias=None, temperature=1.0, softcap=None):
    """float64 transformed logits [..., V]."""
    x = hidden.double() @ weight.double().T
    if bias is not None:
        x = x + bias.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def ref_logprobs(hidden, weight, ids, bias=None, temperature=1.0, softcap=None):
    """(logprobs, lse, entropy) in float64, leading shape of ids."""
    z = ref_logits(hidden, weight, bias, temperature, softcap)
    logq = torch.log_softmax(z, dim=-1)
    lp = logq.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return lp, torch.logsumexp(z, -1), entropy


def ref_grpo_loss(logp, mask, advantages, old=None, ref=None, beta=0.0, eps_low=0.2, eps_high=0.2,
                  loss_type="dapo", level="token", max_completion_length=None):
    """TRL GRPOTrainer's loss, spelled out loop by loop over sequences (float64); returns (loss, metrics)."""
    B, T = logp.shape
    mask = mask.double()
    old = logp.detach() if old is None else old.double()
    adv = advantages.double()
    losses, token_terms, lows, highs, ratios, kls = [], [], [], [], [], []
    for b in range(B):
        n_b = mask[b].sum()
        lr = logp[b] - old[b]
        if level == "sequence":
            lr = ((lr * mask[b]).sum() / max(n_b, 1.0)).expand(T)
        r = torch.exp(lr)
        a = adv[b] if adv.dim() == 2 else adv[b].expand(T)
        r_clip = r.clamp(1 - eps_low, 1 + eps_high)
        term = -torch.minimum(r * a, r_clip * a)
        if ref is not None:
            d = ref[b].double() - logp[b]
            k3 = torch.exp(d) - d - 1
            kls.append(k3 * mask[b])
            term = term + beta * k3
        token_terms.append(term * mask[b])
        losses.append((term * mask[b]).sum() / max(n_b, 1.0))
        lows.append((r < 1 - eps_low) & (a < 0))
        highs.append((r > 1 + eps_high) & (a > 0))
        ratios.append(r)
    total = torch.stack(token_terms).sum()
    if loss_type == "grpo":
        loss = torch.stack(losses).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = total / max(mask.sum(), 1.0)
    else:
        loss = total / (B * (max_completion_length or T))
    metrics = {}
    # TRL averages a [B, 1] quantity over sequences: the sequence-level ratio always, the clip flags when the
    # advantages are per sequence too; [B, T] quantities over unmasked tokens.
    per_seq = level == "sequence" and adv.dim() == 1
    for name, vals, seq in (("clip_low", lows, per_seq), ("clip_high", highs, per_seq),
                            ("ratio", ratios, level == "sequence")):
        v = torch.stack(vals).double()
        metrics[name] = v[:, 0].mean() if seq else (v * mask).sum() / max(mask.sum(), 1.0)
    lo, hi = torch.stack(lows), torch.stack(highs)
    both = (lo | hi).double()
    metrics["clip_fraction"] = both[:, 0].mean() if per_seq else (both * mask).sum() / max(mask.sum(), 1.0)
    if kls:
        metrics["kl"] = torch.stack(kls).sum() / max(mask.sum(), 1.0)
    return loss, metrics


# ----------------------------------------------------------------------------------------------- sparse KL


def _kl(p, q):
    """KL(p || q) over the last dim for probability vectors (float64), 0 log 0 = 0."""
    safe = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return safe.sum(-1)


def _gjsd(p, q, beta):
    """TRL's generalized JSD: beta=0 forward KL(p||q), beta=1 reverse KL(q||p), else beta KL(p||m) +
    (1-beta) KL(q||m) with m = beta p + (1-beta) q."""
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _divergence(p, q, divergence, beta):
    if divergence == "forward":
        return _kl(p, q)
    if divergence == "reverse":
        return _kl(q, p)
    return _gjsd(p, q, beta)


def ref_sparse_kl_per_token(z, teacher_ids, teacher_logprobs, divergence, beta, tail):
    """Per-token divergence [N] from float64 student logits z [N, V] and a top-k teacher [N, k]."""
    N, V = z.shape
    k = teacher_ids.shape[1]
    q = torch.softmax(z, -1)
    p_top = teacher_logprobs.double().exp()
    out = []
    for n in range(N):
        ids = teacher_ids[n].long()
        if tail == "renorm":
            p = p_top[n] / p_top[n].sum()
            qk = q[n, ids] / q[n, ids].sum()
        elif tail == "bucket":
            p_rest = max(1 - p_top[n].sum().item(), 0.0)
            p = torch.cat([p_top[n], torch.tensor([p_rest], dtype=torch.float64)])
            q_rest = 1 - q[n, ids].sum()
            qk = torch.cat([q[n, ids], q_rest.reshape(1)])
        else:  # uniform: the full-vocabulary teacher
            p_rest = max(1 - p_top[n].sum().item(), 0.0) / (V - k)
            p = torch.full((V,), p_rest, dtype=torch.float64)
            p[ids] = p_top[n]
            qk = q[n]
        out.append(_divergence(p, qk, divergence, beta))
    return torch.stack(out)


def ref_sampled_forward_kl(z, sample_ids, teacher_logprobs, weights):
    """sum_j w_j (log p_j - log q_j) per token, float64."""
    logq = torch.log_softmax(z, -1)
    return (weights.double() * (teacher_logprobs.double() - logq.gather(1, sample_ids.long()))).sum(-1)


def reduce(per_token, mask, reduction):
    per_token = per_token * mask.double()
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / max(mask.double().sum().item(), 1.0)


def random_teacher(N, V, k, gen, peak=3.0):
    """Top-k teacher: distinct ids [N, k] (sorted by prob), full-vocabulary log-probs [N, k], and the full p."""
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * peak
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, k, dim=-1)
    return top.indices, top.values.float(), logp.exp()


def entropy_bound(p):
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).max()) if p.numel() else math.nan
