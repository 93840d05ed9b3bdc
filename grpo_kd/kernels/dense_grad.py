"""Triton backward pass: the dense part of d(loss)/d(raw logits), one row chunk at a time.

Every loss in grpo_kd reaches the full vocabulary only through a few per-row statistics (lse, E_q[log q],
sum_v z_v and, for JSD with a uniform tail, a vocabulary sum of an elementwise term; see engine.py). Their
gradient with respect to the transformed logits z of row n is therefore, for every vocabulary entry v,

    g_v = q_v * (a_n + b_n * log q_v) + d_n + c_n * q_v * (log q_v - log(beta p_n + (1 - beta) q_v))

with per-row coefficients a, b, c, d that engine.py derives from the upstream gradients. The kernel recomputes
each logits tile (tiles.logits_tile, tiles.transform_tile), forms g, multiplies by dz/dx (soft cap and temperature) and writes
dx = g * dz/dx into a [chunk, V] buffer in the input dtype.

Key design choice: the two products with that buffer (grad_hidden = dx @ W and grad_W += dx.T @ hidden) are left
to cuBLAS in engine.py, one row chunk at a time, instead of fp32 atomics inside the kernel: atomics over
(row-block x V-tile) would add N/BLOCK_N partial products into every element of grad_W, which is far slower than
a dense GEMM. The chunk bounds the extra memory to `chunk x V` elements, never N x V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kd.kernels._common import LinearOptions
from grpo_kd.kernels.launch import DeviceProps, KernelCall, device_props, plan_launch, run_call
from grpo_kd.kernels.tiles import dot_precision, logits_tile, needs_upcast, transform_tile


@triton.jit
def _dense_grad_kernel(
    h_ptr,  # (N, H) hidden rows of this chunk
    w_ptr,  # (V, H) LM-head weight
    b_ptr,  # (V,) bias or a dummy
    lse_ptr,  # (N,) log-sum-exp of z
    a_ptr,  # (N,) coefficient of q
    bc_ptr,  # (N,) coefficient of q log q; read only if HAS_B
    d_ptr,  # (N,) constant added to every entry; read only if HAS_D
    c_ptr,  # (N,) coefficient of the JSD term; read only if HAS_JSD
    pr_ptr,  # (N,) teacher tail probability p_n; read only if HAS_JSD
    dx_ptr,  # (N, V) out: dx = g * dz/dx in the input dtype
    N, V, H,  # sizes
    stride_hn,  # row stride of h
    stride_wv,  # row stride of W
    stride_dn,  # row stride of dx
    inv_temp,  # 1 / temperature
    softcap,  # soft cap (unused without HAS_SOFTCAP)
    beta,  # JSD mixture weight of the teacher (unused without HAS_JSD)
    HAS_BIAS: tl.constexpr,  # bias given
    HAS_SOFTCAP: tl.constexpr,  # soft cap given
    HAS_B: tl.constexpr,  # entropy-like term present
    HAS_D: tl.constexpr,  # constant term present
    HAS_JSD: tl.constexpr,  # JSD uniform-tail term present
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile per program
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
    DOT_PREC: tl.constexpr,  # tl.dot input precision
    UPCAST: tl.constexpr,  # fp32 tiles before tl.dot (interpreter)
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    x = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST)  # (BN, BV) raw logits
    z, dzdx = transform_tile(x, inv_temp, softcap, HAS_SOFTCAP, True)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    logq = z - lse[:, None]  # log q_v
    q = tl.exp(logq)
    g = q * a[:, None]
    if HAS_B:
        bc = tl.load(bc_ptr + rows, mask=row_ok, other=0.0)
        g += q * logq * bc[:, None]
    if HAS_D:
        d = tl.load(d_ptr + rows, mask=row_ok, other=0.0)
        g += d[:, None]
    if HAS_JSD:
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
        p_rest = tl.load(pr_ptr + rows, mask=row_ok, other=0.0)
        mix = beta * p_rest[:, None] + (1.0 - beta) * q
        g += c[:, None] * q * (logq - tl.log(tl.maximum(mix, 1e-38)))
    dx = g * dzdx
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dx_ptr + rows[:, None] * stride_dn + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


def dense_grad_call(hidden, weight, bias, opts: LinearOptions, lse, a, b, d, c, p_rest, beta: float,
                    props: DeviceProps, allow_tf32: bool | None = None):
    """(KernelCall of `_dense_grad_kernel`, dx (N, V) in hidden's dtype); b, d, c, p_rest may be None. The tensors
    may live on the meta device (static check)."""
    N, H = hidden.shape
    V = weight.shape[0]
    launch = plan_launch("dense_grad", N, H, V, hidden.dtype, props)
    dx = torch.empty(N, V, dtype=hidden.dtype, device=hidden.device)
    args = dict(h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else hidden, lse_ptr=lse, a_ptr=a,
                bc_ptr=b if b is not None else lse, d_ptr=d if d is not None else lse,
                c_ptr=c if c is not None else lse, pr_ptr=p_rest if p_rest is not None else lse, dx_ptr=dx,
                N=N, V=V, H=H, stride_hn=hidden.stride(0), stride_wv=weight.stride(0), stride_dn=dx.stride(0),
                inv_temp=1.0 / opts.temperature, softcap=opts.softcap or 1.0, beta=float(beta))
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_B=b is not None,
                 HAS_D=d is not None, HAS_JSD=c is not None,
                 DOT_PREC=dot_precision(hidden.dtype, not props.interpreter, allow_tf32),
                 UPCAST=needs_upcast(hidden.dtype, props.interpreter))
    grid = lambda cfg: (triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v))  # noqa: E731
    return KernelCall(_dense_grad_kernel, args, flags, launch, grid), dx


def dx_triton(hidden, weight, bias, opts: LinearOptions, lse, a, b, d, c, p_rest, beta: float) -> torch.Tensor:
    """dx (N, V) in hidden's dtype for the rows of `hidden (N, H)`; b, d, c, p_rest may be None."""
    props = device_props(hidden.device)
    call, dx = dense_grad_call(hidden, weight, bias, opts, lse, a, b, d, c, p_rest, beta, props)
    if hidden.shape[0]:
        run_call(call, props)
    return dx
