"""Triton forward pass: per-row statistics of the student's full-vocabulary distribution, tiled over V.

For every row n the kernels sweep the vocabulary in tiles of BLOCK_V columns, recompute the logits tile
`z = transform(h[n] @ W[tile].T + b[tile])` (tiles.logits_tile + tiles.transform_tile), and fold it
into running sums with an online log-sum-exp (running max `m`, rescaled sums):

    s = sum_v exp(z_v - m)                     -> lse = m + log s
    t = sum_v exp(z_v - m) * (z_v - m)         -> E_q[log q] = t / s - log s   (minus the entropy)
    sum_z = sum_v z_v                          (for the "uniform" tail of the sparse KL)

Key design choice: the vocabulary is also split across programs (grid = row blocks x V splits) so that a small
batch still fills the GPU; each split writes its partial (m, s, t, sum_z) and `combine_partials` merges them
in torch (a few [splits, N] tensors). A second kernel, given the lse, sums the elementwise generalised-JSD term
over the vocabulary (only needed for JSD with a uniform tail). Nothing of size N x V is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kd.kernels._common import LinearOptions
from grpo_kd.kernels.launch import DeviceProps, KernelCall, device_props, plan_launch, run_call
from grpo_kd.kernels.tiles import M_INIT, dot_precision, logits_tile, needs_upcast, transform_tile


@triton.jit
def _stats_fwd_kernel(
    h_ptr,  # (N, H) hidden rows
    w_ptr,  # (V, H) LM-head weight
    b_ptr,  # (V,) bias or a dummy
    m_ptr,  # (SPLITS, N) out: running max of z within the split
    s_ptr,  # (SPLITS, N) out: sum exp(z - m)
    t_ptr,  # (SPLITS, N) out: sum exp(z - m) * (z - m); written only if NEED_T
    sz_ptr,  # (SPLITS, N) out: sum z; written only if NEED_SZ
    N, V, H,  # sizes
    stride_hn,  # row stride of h
    stride_wv,  # row stride of W
    v_per_split,  # vocabulary columns per split, a multiple of BLOCK_V
    inv_temp,  # 1 / temperature
    softcap,  # soft cap (unused without HAS_SOFTCAP)
    M_INIT: tl.constexpr,  # finite initial running max
    HAS_BIAS: tl.constexpr,  # bias given
    HAS_SOFTCAP: tl.constexpr,  # soft cap given
    NEED_T: tl.constexpr,  # accumulate t (for the entropy)
    NEED_SZ: tl.constexpr,  # accumulate sum z (for the uniform tail)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
    DOT_PREC: tl.constexpr,  # tl.dot input precision
    UPCAST: tl.constexpr,  # fp32 tiles before tl.dot (interpreter)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_N,), M_INIT, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST)  # (BN, BV) raw logits
        z, _ = transform_tile(x, inv_temp, softcap, HAS_SOFTCAP, False)
        valid = (cols < V)[None, :]
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # every tile holds >= 1 valid column, so m_new is finite
        alpha = tl.exp(m - m_new)  # rescales the old sums to the new max
        d = tl.where(valid, z - m_new[:, None], 0.0)  # z - m_new, 0 on padding
        e = tl.where(valid, tl.exp(d), 0.0)  # exp(z - m_new)
        if NEED_T:
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * d, axis=1)
        if NEED_SZ:
            sz += tl.sum(tl.where(valid, z, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = pid_s * N + rows
    row_ok = rows < N
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if NEED_T:
        tl.store(t_ptr + out, t, mask=row_ok)
    if NEED_SZ:
        tl.store(sz_ptr + out, sz, mask=row_ok)


@triton.jit
def _jsd_rest_fwd_kernel(
    h_ptr,  # (N, H) hidden rows
    w_ptr,  # (V, H) LM-head weight
    b_ptr,  # (V,) bias or a dummy
    lse_ptr,  # (N,) log-sum-exp of z, from _stats_fwd_kernel
    pr_ptr,  # (N,) teacher probability of every id outside the top-k (uniform tail)
    r_ptr,  # (SPLITS, N) out: sum_v (1-beta) q log q - m log m,  m = beta p_r + (1-beta) q
    rq_ptr,  # (SPLITS, N) out: sum_v q (log q - log m)
    N, V, H,  # sizes
    stride_hn,  # row stride of h
    stride_wv,  # row stride of W
    v_per_split,  # vocabulary columns per split
    inv_temp,  # 1 / temperature
    softcap,  # soft cap (unused without HAS_SOFTCAP)
    beta,  # JSD mixture weight of the teacher
    HAS_BIAS: tl.constexpr,  # bias given
    HAS_SOFTCAP: tl.constexpr,  # soft cap given
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
    DOT_PREC: tl.constexpr,  # tl.dot input precision
    UPCAST: tl.constexpr,  # fp32 tiles before tl.dot (interpreter)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p_rest = tl.load(pr_ptr + rows, mask=row_ok, other=0.0)
    r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST)  # (BN, BV) raw logits
        z, _ = transform_tile(x, inv_temp, softcap, HAS_SOFTCAP, False)
        valid = (cols < V)[None, :]
        logq = tl.where(valid, z - lse[:, None], 0.0)  # log q_v
        q = tl.where(valid, tl.exp(logq), 0.0)
        mix = beta * p_rest[:, None] + (1.0 - beta) * q  # m_v
        logm = tl.log(tl.maximum(mix, 1e-38))
        r += tl.sum(tl.where(valid, (1.0 - beta) * q * logq - mix * logm, 0.0), axis=1)
        rq += tl.sum(tl.where(valid, q * (logq - logm), 0.0), axis=1)
    out = pid_s * N + rows
    tl.store(r_ptr + out, r, mask=row_ok)
    tl.store(rq_ptr + out, rq, mask=row_ok)


# ----------------------------------------------------------------------------------------------- launchers


def _common_args(hidden, weight, bias, opts: LinearOptions, props: DeviceProps, allow_tf32) -> tuple[dict, dict]:
    """The tile arguments shared by both sweeps: (runtime args, compile-time flags)."""
    N, H = hidden.shape
    args = dict(h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else hidden, N=N, V=weight.shape[0], H=H,
                stride_hn=hidden.stride(0), stride_wv=weight.stride(0))
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
                 DOT_PREC=dot_precision(hidden.dtype, not props.interpreter, allow_tf32),
                 UPCAST=needs_upcast(hidden.dtype, props.interpreter))
    return args, flags


def stats_call(hidden, weight, bias, opts: LinearOptions, need_entropy: bool, need_sum_z: bool,
               props: DeviceProps, allow_tf32: bool | None = None):
    """(KernelCall of `_stats_fwd_kernel`, (m, s, t, sz) [splits, N] fp32 outputs) for `hidden (N, H)`; the
    tensors may live on the meta device (static check)."""
    N, H = hidden.shape
    V = weight.shape[0]
    launch = plan_launch("stats", N, H, V, hidden.dtype, props)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s = torch.empty(launch.splits, N, **f32), torch.empty(launch.splits, N, **f32)
    t = torch.empty(launch.splits, N, **f32) if need_entropy else s
    sz = torch.empty(launch.splits, N, **f32) if need_sum_z else s
    args, flags = _common_args(hidden, weight, bias, opts, props, allow_tf32)
    args.update(m_ptr=m, s_ptr=s, t_ptr=t, sz_ptr=sz, v_per_split=launch.v_per_split,
                inv_temp=1.0 / opts.temperature, softcap=opts.softcap or 1.0)
    flags.update(M_INIT=M_INIT, NEED_T=need_entropy, NEED_SZ=need_sum_z)
    grid = lambda cfg: (triton.cdiv(N, cfg.block_n), launch.splits)  # noqa: E731
    return KernelCall(_stats_fwd_kernel, args, flags, launch, grid), (m, s, t, sz)


def jsd_rest_call(hidden, weight, bias, opts: LinearOptions, lse, p_rest, beta: float, props: DeviceProps,
                  allow_tf32: bool | None = None):
    """(KernelCall of `_jsd_rest_fwd_kernel`, (r, rq) [splits, N] fp32 outputs)."""
    N, H = hidden.shape
    launch = plan_launch("jsd_rest", N, H, weight.shape[0], hidden.dtype, props)
    r = torch.empty(launch.splits, N, dtype=torch.float32, device=hidden.device)
    rq = torch.empty_like(r)
    args, flags = _common_args(hidden, weight, bias, opts, props, allow_tf32)
    args.update(lse_ptr=lse, pr_ptr=p_rest, r_ptr=r, rq_ptr=rq, v_per_split=launch.v_per_split,
                inv_temp=1.0 / opts.temperature, softcap=opts.softcap or 1.0, beta=float(beta))
    grid = lambda cfg: (triton.cdiv(N, cfg.block_n), launch.splits)  # noqa: E731
    return KernelCall(_jsd_rest_fwd_kernel, args, flags, launch, grid), (r, rq)


def combine_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None):
    """Merge per-split (m, s, t) -> (lse [N], E_q[log q] [N] or None)."""
    top = m.max(dim=0).values  # (N,)
    scale = torch.exp(m - top)  # (S, N)
    s_all = (scale * s).sum(0)  # (N,)
    lse = top + torch.log(s_all)
    if t is None:
        return lse, None
    t_all = (scale * (t + (m - top) * s)).sum(0)  # (N,) sum exp(z - top) (z - top)
    return lse, t_all / s_all - torch.log(s_all)


def stats_triton(hidden, weight, bias, opts: LinearOptions, need_entropy: bool, need_sum_z: bool):
    """(lse, E_q[log q] | None, sum_z | None), each (N,) fp32, for `hidden (N, H)` and `weight (V, H)`."""
    N = hidden.shape[0]
    if N == 0:
        none = hidden.new_zeros(0, dtype=torch.float32)
        return none, none if need_entropy else None, none if need_sum_z else None
    props = device_props(hidden.device)
    call, (m, s, t, sz) = stats_call(hidden, weight, bias, opts, need_entropy, need_sum_z, props)
    run_call(call, props)
    lse, eq_logq = combine_partials(m, s, t if need_entropy else None)
    return lse, eq_logq, sz.sum(0) if need_sum_z else None


def jsd_rest_triton(hidden, weight, bias, opts: LinearOptions, lse, p_rest, beta: float):
    """(R, Rq), each (N,) fp32: the vocabulary sums of the uniform-tail JSD term (see sparse_kl.py)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    props = device_props(hidden.device)
    call, (r, rq) = jsd_rest_call(hidden, weight, bias, opts, lse.contiguous(), p_rest.contiguous(), beta, props)
    run_call(call, props)
    return r.sum(0), rq.sum(0)
