"""The shared differentiable engine: a few per-row statistics of the student's full-vocabulary distribution.

Every loss in grpo_kd needs the student's logits z (N x V) only through

    lse_n      = log sum_v exp(z_nv)                        (N,)    the normaliser
    eq_logq_n  = sum_v q_nv log q_nv                        (N,)    minus the entropy
    sum_z_n    = sum_v z_nv                                 (N,)    uniform-tail forward KL only
    z_ids_nj   = z at a few given ids per row               (N, k)  targets, teacher top-k or samples
    jsd_rest_n = sum_v f(q_nv),  f(q) = beta p log p + (1-beta) q log q - m log m,  m = beta p_n + (1-beta) q
                                                            (N,)    JSD with a uniform tail only

`LinearStatsFunction` computes them from `hidden` and `weight` without an N x V tensor and is differentiable;
each loss is then ordinary torch autograd over these small tensors (see logprobs.py, grpo_loss.py,
sparse_kl.py). The backward pass maps the upstream gradients to the dense gradient of the logits,

    d lse / dz_v      = q_v
    d eq_logq / dz_v  = q_v (log q_v - eq_logq)
    d sum_z / dz_v    = 1
    d jsd_rest / dz_v = (1-beta) q_v (log(q_v / m_v) - sum_u q_u log(q_u / m_u))

i.e.  g_v = q_v (a + b log q_v) + d + c q_v log(q_v / m_v)  with per-row a, b, c, d, plus a sparse part at the
ids, which is gathered (forward) and scattered (backward) with `W[ids]` in row chunks — O(N k H) work, no V sweep.

Key design choice: one autograd primitive for all losses. The Triton path sweeps V in tiles (stats.py,
dense_grad.py); the torch twin here walks row chunks of at most `chunk_bytes` of fp32 logits. Both produce
dx = g * dz/dx one row chunk at a time and finish with two matrix products per chunk (grad_hidden = dx @ W,
grad_W += dx.T @ hidden in fp32). Rows that a loss masks out are dropped before the sweep (`row_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from grpo_kd.kernels._common import (
    LinearOptions,
    chunk_buffers,
    mm_f32,
    row_chunks,
    transform_grad,
    transform_logits,
    xlogx,
)


class RowStats(NamedTuple):
    lse: torch.Tensor | None  # (N,) fp32 log-sum-exp of z
    eq_logq: torch.Tensor | None  # (N,) fp32 E_q[log q] = -entropy
    sum_z: torch.Tensor | None  # (N,) fp32 sum_v z_v
    z_ids: torch.Tensor | None  # (N, k) fp32 transformed logits at the ids
    jsd_rest: torch.Tensor | None  # (N,) fp32 sum_v f(q_v) of the uniform-tail JSD


@dataclass(frozen=True)
class StatsOptions:
    """What `LinearStatsFunction` computes, besides z at the ids (always)."""

    linear: LinearOptions  # temperature, softcap, resolved impl, chunk bytes
    need_lse: bool = True  # False: no V sweep at all (renormalised top-k losses)
    need_entropy: bool = False  # E_q[log q]
    need_sum_z: bool = False  # sum_v z_v
    jsd_beta: float | None = None  # set: also the uniform-tail JSD sums (needs p_rest)


# ----------------------------------------------------------------------------------------------- torch twin


def _matmul_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the twin multiplies with: upcast once per call on the CPU (no half matmul with an fp32 result
    there), as is on CUDA (cuBLAS out_dtype)."""
    return weight if weight.is_cuda or weight.dtype == torch.float32 else weight.float()


def _raw_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out=None) -> torch.Tensor:
    x = mm_f32(h, weight.t(), out=out)  # (c, V), in `out` when given
    if bias is not None:
        x += bias.float()
    return x


def stats_torch(hidden, weight, bias, opts: LinearOptions, need_entropy: bool, need_sum_z: bool, ids=None):
    """Chunked twin of `stats.stats_triton`: (lse, E_q[log q] | None, sum_z | None), each (N,) fp32, and, when
    `ids (N, k)` is given, the raw logits at the ids (N, k) fp32, read from the same chunk (no second gather).

    Per chunk: one matmul into a reused [c, V] buffer, then in place: z - max, exp, row sums. Only the entropy
    needs a second buffer (e = exp(z - max) beside z - max; e * (z - max) then overwrites z)."""
    N, V = hidden.shape[0], weight.shape[0]
    w = _matmul_weight(weight)
    lse = hidden.new_empty(N, dtype=torch.float32)
    eq = hidden.new_empty(N, dtype=torch.float32) if need_entropy else None
    sz = hidden.new_empty(N, dtype=torch.float32) if need_sum_z else None
    x_ids = hidden.new_empty(N, ids.shape[1], dtype=torch.float32) if ids is not None else None
    bufs = chunk_buffers(N, V, 2 if need_entropy else 1, hidden.device, opts.chunk_bytes)
    for sl in row_chunks(N, V, opts.chunk_bytes):
        x = _raw_logits(hidden[sl], w, bias, out=bufs[0][: sl.stop - sl.start])  # (c, V)
        if x_ids is not None:
            x_ids[sl] = x.gather(1, ids[sl])
        z = transform_logits(x, opts.temperature, opts.softcap, inplace=True)  # (c, V)
        if sz is not None:
            sz[sl] = z.sum(-1)
        top = z.amax(-1, keepdim=True)  # (c, 1)
        z -= top  # z - max, in place
        if eq is None:
            s = z.exp_().sum(-1)  # (c,)
        else:
            e = torch.exp(z, out=bufs[1][: sl.stop - sl.start])  # (c, V)
            s = e.sum(-1)
            eq[sl] = z.mul_(e).sum(-1) / s - s.log()  # sum q (z - lse) = sum e (z - max) / s - log s
        lse[sl] = top[:, 0] + s.log()
    return lse, eq, sz, x_ids


def jsd_rest_torch(hidden, weight, bias, opts: LinearOptions, lse, p_rest, beta: float):
    """Chunked twin of `stats.jsd_rest_triton`: (R, Rq) without the constant beta p log p terms."""
    N, V = hidden.shape[0], weight.shape[0]
    w = _matmul_weight(weight)
    r = hidden.new_empty(N, dtype=torch.float32)
    rq = torch.empty_like(r)
    (buf,) = chunk_buffers(N, V, 1, hidden.device, opts.chunk_bytes)
    for sl in row_chunks(N, V, opts.chunk_bytes):
        x = _raw_logits(hidden[sl], w, bias, out=buf[: sl.stop - sl.start])  # (c, V)
        logq = transform_logits(x, opts.temperature, opts.softcap, inplace=True)
        logq -= lse[sl, None]  # (c, V)
        q = logq.exp()
        mix = beta * p_rest[sl, None] + (1.0 - beta) * q  # (c, V)
        logm = mix.clamp_min(1e-38).log()
        r[sl] = ((1.0 - beta) * q * logq - mix * logm).sum(-1)
        rq[sl] = (q * (logq - logm)).sum(-1)
    return r, rq


def dx_torch(hidden, weight, bias, opts: LinearOptions, lse, a, b, d, c, p_rest, beta: float,
             work: list | None = None) -> torch.Tensor:
    """Twin of `dense_grad.dx_triton` for one row chunk: dx (c, V) in hidden's dtype.

    g = q (a + b log q) + d + c q (log q - log m), then dx = g dz/dx, built in place in `work` (two fp32 [c, V]
    buffers, reused across chunks; fresh ones when None); with only `a` (log-prob and GRPO losses, the bucket
    KL) q overwrites log q and one buffer does."""
    x_out, q_out = (list(work or []) + [None, None])[:2]
    x = _raw_logits(hidden, weight, bias, out=x_out)  # (c, V)
    dzdx = transform_grad(x, opts.temperature, opts.softcap)  # before x is overwritten
    logq = transform_logits(x, opts.temperature, opts.softcap, inplace=True).sub_(lse[:, None])  # (c, V)
    jsd = None
    if b is None and c is None:
        g = logq.exp_().mul_(a[:, None])  # q a, in log q's buffer
    else:
        q = torch.exp(logq) if q_out is None else torch.exp(logq, out=q_out)  # (c, V)
        if c is not None:  # c q (log q - log m), m = beta p + (1 - beta) q
            jsd = torch.mul(q, 1.0 - beta).add_(beta * p_rest[:, None]).clamp_min_(1e-38).log_()
            jsd.neg_().add_(logq).mul_(q).mul_(c[:, None])
        if b is not None:
            g = logq.mul_(b[:, None]).add_(a[:, None]).mul_(q)  # q (a + b log q), in log q's buffer
        else:
            g = q.mul_(a[:, None])
    if d is not None:
        g += d[:, None]
    if jsd is not None:
        g += jsd
    if not isinstance(dzdx, float) or dzdx != 1.0:
        g *= dzdx
    return g.to(hidden.dtype)


# ----------------------------------------------------------------------------------------------- sparse part


def _id_chunks(n_rows: int, k: int, H: int, budget: int) -> list[slice]:
    step = max(1, budget // max(1, k * H * 4))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def gather_raw_logits(hidden, weight, bias, ids, budget: int) -> torch.Tensor:
    """x at the ids: (N, k) fp32, hidden[n] . W[ids[n, j]] (+ b), by chunks of gathered weight rows."""
    N, k = ids.shape
    out = hidden.new_empty(N, k, dtype=torch.float32)
    for sl in _id_chunks(N, k, hidden.shape[1], budget):
        w = weight[ids[sl]].float()  # (c, k, H)
        out[sl] = torch.bmm(w, hidden[sl].float().unsqueeze(-1)).squeeze(-1)  # (c, k)
    if bias is not None:
        out += bias.float()[ids]
    return out


def scatter_sparse_grad(hidden, weight, ids, coef, gh, gw, gb, budget: int) -> None:
    """Add the sparse gradient coef (N, k) at the ids into gh (N, H), gw (V, H), gb (V,) (fp32, any may be None)."""
    N, k = ids.shape
    for sl in _id_chunks(N, k, hidden.shape[1], budget):
        if gh is not None:
            w = weight[ids[sl]].float()  # (c, k, H)
            gh[sl] += torch.bmm(coef[sl].unsqueeze(1), w).squeeze(1)  # (c, H)
        if gw is not None:
            rows = coef[sl].unsqueeze(-1) * hidden[sl].float().unsqueeze(1)  # (c, k, H)
            gw.index_add_(0, ids[sl].reshape(-1), rows.reshape(-1, rows.shape[-1]))
    if gb is not None:
        gb.index_add_(0, ids.reshape(-1), coef.reshape(-1))


# ----------------------------------------------------------------------------------------------- dense backward


def dense_backward(hidden, weight, bias, opts: LinearOptions, lse, coefs, p_rest, beta, needs, ids=None,
                   sparse=None):
    """fp32 (grad_hidden | None, grad_W | None, grad_bias | None), one row chunk at a time.

    `coefs` = (a, b, d, c), each (N,) or None (a never None); `needs` = (hidden, weight, bias) flags. The sparse
    gradient `sparse (N, k)` at `ids (N, k)` (optional) is added into each chunk's dx before its two products,
    so it costs a scatter of c x k entries instead of gathers of k weight rows per token."""
    N, H = hidden.shape
    V = weight.shape[0]
    a, b, d, c = coefs
    gh = hidden.new_zeros(N, H, dtype=torch.float32) if needs[0] else None
    gw = weight.new_zeros(V, H, dtype=torch.float32) if needs[1] else None
    gb = weight.new_zeros(V, dtype=torch.float32) if needs[2] else None
    pick = lambda t, sl: None if t is None else t[sl]  # noqa: E731
    if opts.impl == "triton":
        from grpo_kd.kernels.dense_grad import dx_triton

        w = weight
        make_dx = lambda sl, *args: dx_triton(*args)  # noqa: E731
    else:
        w = _matmul_weight(weight)
        bufs = chunk_buffers(N, V, 1 if b is None and c is None else 2, hidden.device, opts.chunk_bytes)
        make_dx = lambda sl, *args: dx_torch(*args, work=[buf[: sl.stop - sl.start] for buf in bufs])  # noqa: E731
    for sl in row_chunks(N, V, opts.chunk_bytes):
        dx = make_dx(sl, hidden[sl], w, bias, opts, lse[sl], a[sl], pick(b, sl), pick(d, sl), pick(c, sl),
                     pick(p_rest, sl), beta)  # (c, V) input dtype
        if sparse is not None:
            dx.scatter_add_(1, ids[sl], sparse[sl].to(dx.dtype))
        if gh is not None:
            mm_f32(dx, w, out=gh[sl])  # (c, H)
        if gw is not None:
            if dx.dtype == torch.float32 and hidden.dtype == torch.float32:
                gw.addmm_(dx.t(), hidden[sl])  # (V, H), in place
            else:
                gw += mm_f32(dx.t(), hidden[sl])
        if gb is not None:
            gb += dx.float().sum(0)
    return gh, gw, gb


# ----------------------------------------------------------------------------------------------- autograd


class LinearStatsFunction(torch.autograd.Function):
    """(hidden, weight, bias, ids, p_rest) -> (lse, eq_logq, sum_z, z_ids, jsd_rest); unneeded outputs are empty."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, p_rest, opts: StatsOptions):
        lin = opts.linear
        lse = eq = sz = r = rq = x_ids = None
        if opts.need_lse:
            if lin.impl == "triton":
                from grpo_kd.kernels.stats import jsd_rest_triton as rest_fn, stats_triton

                lse, eq, sz = stats_triton(hidden, weight, bias, lin, opts.need_entropy, opts.need_sum_z)
            else:  # the twin reads x at the ids from the chunks it computes anyway
                rest_fn = jsd_rest_torch
                lse, eq, sz, x_ids = stats_torch(hidden, weight, bias, lin, opts.need_entropy, opts.need_sum_z, ids)
            if opts.jsd_beta is not None:
                beta = opts.jsd_beta
                r, rq = rest_fn(hidden, weight, bias, lin, lse, p_rest, beta)
                r = r + weight.shape[0] * beta * xlogx(p_rest)  # the constant beta p log p of every entry
        if x_ids is None:
            x_ids = gather_raw_logits(hidden, weight, bias, ids, lin.chunk_bytes)  # (N, k)
        z_ids = transform_logits(x_ids, lin.temperature, lin.softcap)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, ids, p_rest, lse, eq, rq, x_ids)
        ctx.opts = opts
        return tuple(hidden.new_empty(0, dtype=torch.float32) if t is None else t for t in (lse, eq, sz, z_ids, r))

    @staticmethod
    def backward(ctx, g_lse, g_eq, g_sz, g_zids, g_rest):
        hidden, weight, bias, ids, p_rest, lse, eq, rq, x_ids = ctx.saved_tensors
        opts: StatsOptions = ctx.opts
        lin = opts.linear
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        a = g_lse.float() if g_lse is not None else None
        b = d = c = None
        if g_eq is not None:
            b = g_eq.float()
            a = -b * eq if a is None else a - b * eq
        if g_sz is not None:
            d = g_sz.float()
        if g_rest is not None:
            c = (1.0 - opts.jsd_beta) * g_rest.float()
            a = -c * rq if a is None else a - c * rq
        coef = None
        if g_zids is not None and ids.numel():
            coef = g_zids.float() * transform_grad(x_ids, lin.temperature, lin.softcap)  # (N, k) d loss / d x_ids
        if a is None and d is None:
            gh = hidden.new_zeros(hidden.shape, dtype=torch.float32) if needs[0] else None
            gw = weight.new_zeros(weight.shape, dtype=torch.float32) if needs[1] else None
            gb = weight.new_zeros(weight.shape[0], dtype=torch.float32) if needs[2] else None
            if coef is not None:  # no vocabulary sweep (renormalised top-k): gather-scatter the k weight rows
                scatter_sparse_grad(hidden, weight, ids, coef, gh, gw, gb, lin.chunk_bytes)
        else:
            a = torch.zeros_like(lse) if a is None else a
            beta = opts.jsd_beta or 0.0
            gh, gw, gb = dense_backward(hidden, weight, bias, lin, lse, (a, b, d, c), p_rest, beta, needs, ids, coef)
        return (
            None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None, None, None,
        )


def linear_stats(hidden, weight, bias, ids, opts: StatsOptions, p_rest=None, row_mask=None) -> RowStats:
    """Differentiable `RowStats` for `hidden (N, H)`, `weight (V, H)`, `ids (N, k)` int64 in [0, V).

    Rows where `row_mask (N,)` is False are skipped: their statistics are 0 and get no gradient.
    """
    N = hidden.shape[0]
    if row_mask is not None and not bool(row_mask.all()):
        keep = row_mask.nonzero().squeeze(1)  # (n,)
        sub = linear_stats(hidden.index_select(0, keep), weight, bias, ids.index_select(0, keep), opts,
                           None if p_rest is None else p_rest.index_select(0, keep))
        spread = lambda t: None if t is None else t.new_zeros(N, *t.shape[1:]).index_copy(0, keep, t)  # noqa: E731
        return RowStats(*(spread(t) for t in sub))
    outs = LinearStatsFunction.apply(hidden, weight, bias, ids, p_rest, opts)
    lse, eq, sz, z_ids, r = outs
    return RowStats(
        lse if opts.need_lse else None,
        eq if opts.need_lse and opts.need_entropy else None,
        sz if opts.need_lse and opts.need_sum_z else None,
        z_ids,
        r if opts.need_lse and opts.jsd_beta is not None else None,
    )
