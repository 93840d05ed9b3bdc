r"""`linear_sparse_kl`: divergences between the student (full vocabulary) and a sparse cached teacher.

Notation, per token: student logits z over V (from hidden states, `_common.py`), q = softmax(z), log q_v =
z_v - lse. Teacher: k distinct ids S with full-vocabulary-normalised log-probs log p_j (j in S), and its mass
outside them P = 1 - sum_{j in S} p_j = -expm1(logsumexp(log p_S)), clamped to >= 0. The student's mass
outside S is Q = -expm1(logsumexp(log q_S)), clamped likewise. A rest that enters a logarithm is floored at
TAIL_EPS = 1e-8 (in fp32 a rest below ~1e-6 is rounding noise anyway).

Divergences between distributions a (teacher side) and b (student side) over a set of categories C:

    forward  KL(a || b) = sum_c a_c log(a_c / b_c)
    reverse  KL(b || a) = sum_c b_c log(b_c / a_c)
    jsd      beta KL(a || m) + (1 - beta) KL(b || m),  m = beta a + (1 - beta) b

`jsd` follows TRL's GKDTrainer.generalized_jsd_loss (and Liger's JSD): beta weights the teacher in the mixture,
and the end points are special-cased exactly as there: beta = 0 is the forward KL, beta = 1 the reverse KL
(the mixture formula itself would vanish at both ends).

A general identity gives every gradient below: if the loss depends on q through category masses Q_c = sum_{v in
c} q_v, then d loss / d z_v = q_v (g_c(v) - sum_c Q_c g_c),  g_c = d loss / d Q_c.

tail = "bucket" — C = S plus one rest bucket: a = (p_S, P), b = (q_S, Q); the exact divergence between the two
  collapsed (k+1)-category distributions. Gradients (c(v) = the category of v, rest for v outside S):
    forward  d/dz_v = q_v (1 - a_c(v) / b_c(v))            = q_j - p_j on S,  q_v (1 - P / Q) outside
    reverse  d/dz_v = q_v (log(b_c(v) / a_c(v)) - L)       L = the loss of this token
    jsd      d/dz_v = (1-beta) q_v (log(b_c(v) / m_c(v)) - sum_c b_c log(b_c / m_c))
tail = "renorm" — C = S: a = p_S / sum p_S, b = q_S / sum q_S (softmax of z over S). Needs no vocabulary
  sweep at all; entries outside S get no gradient. On S, with b_j = q~_j:
    forward  q~_j - p~_j;  reverse  q~_j (log(q~_j / p~_j) - L);  jsd  (1-beta) q~_j (log(q~_j/m_j) - sum q~ log(q~/m))
tail = "uniform" — the teacher is completed to the full vocabulary with p_v = P / (V - k) =: p_r for v not in S;
  C = V, b = q. Closed forms that need only the engine's row statistics:
    forward  sum_S p_j (log p_j - log q_j) + (V-k) p_r log p_r - p_r (sum_z - sum_S z_j - (V-k) lse)
             d/dz_v = q_v - p_v                                      (p_v = p_r outside S)
    reverse  E_q[log q] - sum_S q_j log p_j - Q log p_r
             d/dz_v = q_v (log(q_v / p_v) - L)
    jsd      R + sum_S [f(p_j, q_j) - f(p_r, q_j)],  f(p, q) = beta p log p + (1-beta) q log q - m log m,
             R = sum_v f(p_r, q_v) over the whole vocabulary (a second, elementwise V sweep)
             d/dz_v = (1-beta) q_v (log(q_v / m_v) - sum_u q_u log(q_u / m_u))

Sampled mode (`teacher_weights` given): the ids are m draws from the teacher (repeats allowed) with weights w
summing to 1 per token (for plain sampling w = 1/m; importance weights otherwise), and the log-probs are the
teacher's at those ids. Only the forward KL has an unbiased estimate from teacher samples:

    KL^(p || q) = sum_j w_j (log p_j - log q_j),     d/dz_v = q_v - sum_j w_j [id_j = v]

whose expectation is q - p, the exact gradient of KL(p || q). The reverse KL and the JSD need the teacher's
probability where the *student* puts mass, which teacher samples do not give: they raise an error. `tail`
is ignored in sampled mode.

Duplicate ids within a top-k row are a user error (they would count a category twice) and raise. Key design
choice: the student enters only through the engine's row statistics (engine.py) plus z at the k ids, so the
loss below is ordinary torch autograd over [N, k] tensors and the V-sized work stays in the fused kernels.
"""

from __future__ import annotations

import math

import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels._common import check_ids, flatten_rows, make_options, prepare_linear, reduction_check
from grpo_kd.kernels.engine import RowStats, StatsOptions, linear_stats

DIVERGENCES = ("forward", "reverse", "jsd")
TAILS = ("bucket", "renorm", "uniform")
TAIL_EPS = 1e-8
TEACHER_LOGP_FLOOR = -1e4  # -inf teacher log-probs (underflowed) become this: p = 0 exactly, log p finite


def _rest_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """1 - sum_j exp(logprobs_j), computed as -expm1(logsumexp) and clamped to >= 0: (N,)."""
    return (-torch.expm1(torch.logsumexp(logprobs, dim=-1).clamp(max=0.0))).clamp(min=0.0)


def _divergence(log_a: torch.Tensor, log_b: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Divergence per row between categorical a (teacher) and b (student) given as finite log-probs (N, C)."""
    a, b = log_a.exp(), log_b.exp()
    if divergence == "forward":
        return (a * (log_a - log_b)).sum(-1)
    if divergence == "reverse":
        return (b * (log_b - log_a)).sum(-1)
    log_m = torch.logaddexp(log_a + math.log(beta), log_b + math.log1p(-beta))  # (N, C)
    return beta * (a * (log_a - log_m)).sum(-1) + (1 - beta) * (b * (log_b - log_m)).sum(-1)


def _bucket(stats: RowStats, t_logp, divergence, beta):
    s_logp = stats.z_ids - stats.lse[:, None]  # (N, k) student log q at the teacher ids
    log_p_rest = _rest_mass(t_logp).clamp(min=TAIL_EPS).log()  # (N,)
    log_q_rest = _rest_mass(s_logp).clamp(min=TAIL_EPS).log()
    log_a = torch.cat([t_logp, log_p_rest[:, None]], dim=1)  # (N, k+1)
    log_b = torch.cat([s_logp, log_q_rest[:, None]], dim=1)
    return _divergence(log_a, log_b, divergence, beta)


def _renorm(stats: RowStats, t_logp, divergence, beta):
    log_a = torch.log_softmax(t_logp, dim=-1)  # (N, k)
    log_b = torch.log_softmax(stats.z_ids, dim=-1)
    return _divergence(log_a, log_b, divergence, beta)


def _uniform(stats: RowStats, t_logp, log_p_r, n_rest: int, divergence, beta):
    """Full-vocabulary divergence with the teacher's rest spread evenly over the n_rest = V - k other ids."""
    s_logp = stats.z_ids - stats.lse[:, None]  # (N, k)
    p, q = t_logp.exp(), s_logp.exp()  # (N, k)
    p_r = log_p_r.exp()  # (N,)
    if divergence == "forward":
        sum_rest_logq = stats.sum_z - stats.z_ids.sum(-1) - n_rest * stats.lse  # sum over v not in S of log q_v
        return (p * (t_logp - s_logp)).sum(-1) + n_rest * p_r * log_p_r - p_r * sum_rest_logq
    if divergence == "reverse":
        q_rest = _rest_mass(s_logp)
        return stats.eq_logq - (q * t_logp).sum(-1) - q_rest * log_p_r

    def f(p_, log_p_, q_, log_q_):  # beta p log p + (1-beta) q log q - m log m, elementwise
        log_m = torch.logaddexp(log_p_ + math.log(beta), log_q_ + math.log1p(-beta))
        return beta * p_ * log_p_ + (1 - beta) * q_ * log_q_ - log_m.exp() * log_m

    at_ids = f(p, t_logp, q, s_logp) - f(p_r[:, None], log_p_r[:, None].expand_as(q), q, s_logp)  # (N, k)
    return stats.jsd_rest + at_ids.sum(-1)


def _check_teacher(teacher_ids, teacher_logprobs, teacher_weights, lead, V, valid):
    ids = flatten_rows(teacher_ids, lead, "teacher_ids", trailing=1)  # (N, k)
    t_logp = flatten_rows(teacher_logprobs, lead, "teacher_logprobs", trailing=1)
    if t_logp.shape != ids.shape:
        want, got = list(teacher_ids.shape), list(teacher_logprobs.shape)
        raise GrpoKdError(f"teacher_logprobs must have the shape of teacher_ids {want}, got {got}")
    if ids.shape[1] == 0:
        raise GrpoKdError("teacher_ids must hold at least one id per token (k >= 1)")
    ids = check_ids(ids, V, "teacher_ids", valid=valid[:, None])
    t_logp = torch.where(valid[:, None], t_logp.float(), torch.full_like(t_logp, -30.0, dtype=torch.float32))
    if torch.isnan(t_logp).any() or (t_logp > 1e-3).any():
        raise GrpoKdError("teacher_logprobs must be log-probabilities (<= 0, no NaN) on unmasked tokens")
    t_logp = t_logp.clamp(min=TEACHER_LOGP_FLOOR, max=0.0)
    weights = None
    if teacher_weights is not None:
        weights = flatten_rows(teacher_weights, lead, "teacher_weights", trailing=1).float()
        if weights.shape != ids.shape:
            want, got = list(teacher_ids.shape), list(teacher_weights.shape)
            raise GrpoKdError(f"teacher_weights must have the shape of teacher_ids {want}, got {got}")
        weights = torch.where(valid[:, None], weights, torch.zeros_like(weights))
        if (weights < 0).any() or ((weights.sum(-1) - 1).abs() > 1e-3)[valid].any():
            raise GrpoKdError("teacher_weights must be >= 0 and sum to 1 over each unmasked token's samples")
    elif ids.shape[1] > 1:
        ordered = ids.sort(dim=-1).values
        repeated = ((ordered[:, 1:] == ordered[:, :-1]).any(-1) & valid).nonzero()
        if repeated.numel():
            raise GrpoKdError(f"teacher_ids repeats an id in token {int(repeated[0])}; top-k ids must be distinct "
                              "(pass teacher_weights for sampled ids)")
    return ids, t_logp, weights


def linear_sparse_kl(
    hidden: torch.Tensor,  # (N, H) or (B, T, H)
    weight: torch.Tensor,  # (V, H)
    teacher_ids: torch.Tensor,  # (N, k) or (B, T, k): top-k ids, or m sampled ids with teacher_weights
    teacher_logprobs: torch.Tensor,  # same shape: the teacher's full-vocabulary log-probs at those ids
    *,
    mask: torch.Tensor | None = None,  # (N,) or (B, T); 0 = ignore the token
    divergence: str = "reverse",
    beta: float = 0.5,
    tail: str = "bucket",
    teacher_weights: torch.Tensor | None = None,  # same shape as teacher_ids: sample weights summing to 1
    bias: torch.Tensor | None = None,  # (V,)
    temperature: float = 1.0,
    softcap: float | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """The divergence (see the module docstring): a scalar (mean over unmasked tokens, or sum), or per token
    with hidden's leading shape for reduction="none" (0 on masked tokens). fp32, differentiable w.r.t. hidden,
    weight and bias."""
    if divergence not in DIVERGENCES:
        raise GrpoKdError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if tail not in TAILS:
        raise GrpoKdError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise GrpoKdError(f"beta must be in [0, 1], got {beta!r}")
    reduction_check(reduction)
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL's end points
        divergence = "forward" if beta == 0.0 else "reverse"
    if teacher_weights is not None and divergence != "forward":
        raise GrpoKdError(f"divergence={divergence!r} cannot be estimated from teacher samples; with "
                          "teacher_weights only divergence='forward' (an unbiased estimate) is defined")

    hidden2, lead, weight, bias = prepare_linear(hidden, weight, bias)
    N, V = hidden2.shape[0], weight.shape[0]
    if mask is None:
        valid = torch.ones(N, dtype=torch.bool, device=hidden2.device)
    else:
        valid = flatten_rows(mask, lead, "mask") != 0  # (N,)
    ids, t_logp, weights = _check_teacher(teacher_ids, teacher_logprobs, teacher_weights, lead, V, valid)
    k = ids.shape[1]
    if teacher_weights is None and tail == "uniform" and k >= V:
        raise GrpoKdError(f"tail='uniform' needs k < V, got k={k} and V={V}")

    linear = make_options(temperature, softcap, impl, hidden2, weight)
    uniform = teacher_weights is None and tail == "uniform"
    log_p_r = p_r = None
    if uniform:
        log_p_r = _rest_mass(t_logp).clamp(min=TAIL_EPS).log() - math.log(V - k)  # (N,)
        p_r = log_p_r.exp()
    opts = StatsOptions(
        linear,
        need_lse=teacher_weights is not None or tail != "renorm",
        need_entropy=uniform and divergence == "reverse",
        need_sum_z=uniform and divergence == "forward",
        jsd_beta=float(beta) if uniform and divergence == "jsd" else None,
    )
    stats = linear_stats(hidden2, weight, bias, ids, opts, p_rest=p_r, row_mask=valid)

    if teacher_weights is not None:
        per_token = (weights * (t_logp - (stats.z_ids - stats.lse[:, None]))).sum(-1)  # (N,)
    elif tail == "bucket":
        per_token = _bucket(stats, t_logp, divergence, beta)
    elif tail == "renorm":
        per_token = _renorm(stats, t_logp, divergence, beta)
    else:
        per_token = _uniform(stats, t_logp, log_p_r, V - k, divergence, beta)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))  # (N,)
    if reduction == "none":
        return per_token.reshape(lead)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)
