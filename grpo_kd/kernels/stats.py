"""Triton forward pass: per-row statistics of the student's full-vocabulary distribution, tiled over V.

For every row n the kernels sweep the vocabulary in tiles of BLOCK_V columns, recompute the logits tile
`z = transform(h[n] @ W[tile].T + b[tile])` with `tl.dot` over BLOCK_H slices of the hidden size, and fold it
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

from grpo_kd.kernels._common import LinearOptions, interpreter_on

_M_INIT = -1.0e30  # finite "minus infinity" for the running max, so that (m_old - m_new) * 0 is 0, never NaN


@triton.jit
def _logits_tile(
    h_ptr,  # (N, H) hidden rows, unit stride along H
    w_ptr,  # (V, H) LM-head weight, unit stride along H
    b_ptr,  # (V,) bias; never read when HAS_BIAS is False
    rows,  # (BLOCK_N,) row indices of this tile
    cols,  # (BLOCK_V,) vocabulary indices of this tile
    N, V, H,  # sizes
    stride_hn,  # row stride of h
    stride_wv,  # row stride of W
    inv_temp,  # 1 / temperature
    softcap,  # Gemma soft cap; unused when HAS_SOFTCAP is False
    HAS_BIAS: tl.constexpr,  # add b[cols]
    HAS_SOFTCAP: tl.constexpr,  # apply softcap * tanh(x / softcap)
    BLOCK_N: tl.constexpr,  # len(rows)
    BLOCK_V: tl.constexpr,  # len(cols)
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
    DOT_PREC: tl.constexpr,  # "ieee" for exact fp32, "tf32" when torch allows it
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter cannot multiply bf16)
):
    """Transformed logits z (BLOCK_N, BLOCK_V) in fp32 and dz/dx (same shape, or a scalar)."""
    row_ok = rows < N
    col_ok = cols < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        h_mask = row_ok[:, None] & h_ok[None, :]
        w_mask = col_ok[:, None] & h_ok[None, :]
        h_tile = tl.load(h_ptr + rows[:, None] * stride_hn + hs[None, :], mask=h_mask, other=0.0)  # (BN, BH)
        w_tile = tl.load(w_ptr + cols[:, None] * stride_wv + hs[None, :], mask=w_mask, other=0.0)  # (BV, BH)
        if UPCAST:
            h_tile = h_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(h_tile, tl.trans(w_tile), acc, input_precision=DOT_PREC)  # x += h @ W.T
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0  # tanh(x / softcap), stable for large |x|
        z = softcap * th * inv_temp
        dzdx = (1.0 - th * th) * inv_temp
    else:
        z = acc * inv_temp
        dzdx = acc * 0.0 + inv_temp
    return z, dzdx


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
        z, _ = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv, inv_temp, softcap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST)
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
        z, _ = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv, inv_temp, softcap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST)
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


def block_sizes(hidden: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H): larger tiles on a GPU; small ones in the interpreter (numpy per program)."""
    if interpreter_on() or not hidden.is_cuda:
        return 16, 128, 32
    return 64, 128, 64


def dot_precision(hidden: torch.Tensor) -> str:
    """tf32 for fp32 inputs only when torch itself allows tf32 matmuls; exact otherwise."""
    if hidden.dtype == torch.float32 and hidden.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast(hidden: torch.Tensor) -> bool:
    """The Triton interpreter (numpy) cannot tl.dot half-precision tiles; upcast them there."""
    return interpreter_on() and hidden.dtype != torch.float32


def _splits(n_rows: int, V: int, block_n: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """Split V across programs until there are about 4 programs per SM; returns (splits, v_per_split)."""
    n_tiles = triton.cdiv(V, block_v)
    row_blocks = triton.cdiv(n_rows, block_n)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # the interpreter: exercise the split-combine path, cheaply
    splits = max(1, min(n_tiles, triton.cdiv(target, row_blocks)))
    v_per_split = triton.cdiv(n_tiles, splits) * block_v
    return triton.cdiv(V, v_per_split), v_per_split


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
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        none = hidden.new_zeros(0, dtype=torch.float32)
        return none, none if need_entropy else None, none if need_sum_z else None
    bn, bv, bh = block_sizes(hidden)
    splits, v_per_split = _splits(N, V, bn, bv, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s = torch.empty(splits, N, **f32), torch.empty(splits, N, **f32)
    t = torch.empty(splits, N, **f32) if need_entropy else s
    sz = torch.empty(splits, N, **f32) if need_sum_z else s
    grid = (triton.cdiv(N, bn), splits)
    _stats_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, m, s, t, sz, N, V, H,
        hidden.stride(0), weight.stride(0), v_per_split, 1.0 / opts.temperature, opts.softcap or 1.0,
        M_INIT=_M_INIT, HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        NEED_T=need_entropy, NEED_SZ=need_sum_z, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        DOT_PREC=dot_precision(hidden), UPCAST=upcast(hidden),
    )
    lse, eq_logq = combine_partials(m, s, t if need_entropy else None)
    return lse, eq_logq, sz.sum(0) if need_sum_z else None


def jsd_rest_triton(hidden, weight, bias, opts: LinearOptions, lse, p_rest, beta: float):
    """(R, Rq), each (N,) fp32: the vocabulary sums of the uniform-tail JSD term (see sparse_kl.py)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    bn, bv, bh = block_sizes(hidden)
    splits, v_per_split = _splits(N, V, bn, bv, hidden.device)
    r = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    rq = torch.empty_like(r)
    grid = (triton.cdiv(N, bn), splits)
    _jsd_rest_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, lse.contiguous(), p_rest.contiguous(), r, rq, N, V, H,
        hidden.stride(0), weight.stride(0), v_per_split, 1.0 / opts.temperature, opts.softcap or 1.0, float(beta),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, DOT_PREC=dot_precision(hidden), UPCAST=upcast(hidden),
    )
    return r.sum(0), rq.sum(0)
