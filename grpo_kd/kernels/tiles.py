"""The tile toolkit: the one logit tile, the one soft-cap/temperature transform, the one precision rule and the
one vocabulary work split that every Triton kernel of grpo_kd.kernels (stats, jsd_rest, dense_grad, topk) uses.

    x = h[rows] @ W[cols].T (+ b[cols])      `logits_tile`: tl.dot over BLOCK_H slices of H, fp32 accumulation
    z = softcap * tanh(x / softcap) / T      `transform_tile` (no cap: z = x / T), with dz/dx when asked
    precision                                `dot_precision` / `needs_upcast`: exact fp32 unless torch allows TF32;
                                             half tiles are upcast only inside the CPU interpreter
    work split                               `vocab_split`: how many programs share one row block's vocabulary

Key design choice: the teacher's cached log-probs (topk.py) and the student's loss (stats.py, dense_grad.py)
come from the same jitted `logits_tile`, so a change of formula or of tiling happens here once and the two sides
cannot drift apart. The tile loads are plain masked loads with unit stride along H: with 16-byte aligned rows
(Triton specialises pointers and strides divisible by 16) the software pipeliner turns them into `num_stages`-deep
asynchronous copies into shared memory, which the static check (static_check.py) verifies from the compiled
kernel's shared-memory size.
The matching torch transform is `_common.transform_logits` (tanh there, 2*sigmoid(2y) - 1 here: equal in exact
arithmetic, and the sigmoid form saturates cleanly for large |x| in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

M_INIT = -1.0e30  # finite "minus infinity" for running maxima: (m_old - m_new) * 0 stays 0, never NaN


@triton.jit
def transform_tile(
    x,  # (BLOCK_N, BLOCK_V) raw fp32 logits
    inv_temp,  # 1 / temperature
    softcap,  # Gemma soft cap; unused when HAS_SOFTCAP is False
    HAS_SOFTCAP: tl.constexpr,  # apply softcap * tanh(x / softcap)
    NEED_GRAD: tl.constexpr,  # also return dz/dx (else 0.0)
):
    """(z, dz/dx): z = softcap * tanh(x / softcap) / T (or x / T), dz/dx = (1 - tanh^2) / T (or 1 / T)."""
    if HAS_SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0  # tanh(x / softcap), stable for large |x|
        z = softcap * th * inv_temp
        if NEED_GRAD:
            dzdx = (1.0 - th * th) * inv_temp
        else:
            dzdx = 0.0
    else:
        z = x * inv_temp
        dzdx = inv_temp
    return z, dzdx


@triton.jit
def logits_tile(
    h_ptr,  # (N, H) hidden rows, unit stride along H
    w_ptr,  # (V, H) LM-head weight, unit stride along H
    b_ptr,  # (V,) bias; never read when HAS_BIAS is False
    rows,  # (BLOCK_N,) int row indices of this tile
    cols,  # (BLOCK_V,) int vocabulary indices of this tile
    N, V, H,  # sizes
    stride_hn,  # row stride of h
    stride_wv,  # row stride of W
    HAS_BIAS: tl.constexpr,  # add b[cols]
    BLOCK_N: tl.constexpr,  # len(rows)
    BLOCK_V: tl.constexpr,  # len(cols)
    BLOCK_H: tl.constexpr,  # hidden slice per tl.dot
    DOT_PREC: tl.constexpr,  # "ieee" for exact fp32, "tf32" when torch allows it (ignored for half inputs)
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter cannot multiply half tiles)
):
    """Raw logits x (BLOCK_N, BLOCK_V) in fp32: h[rows] @ W[cols].T (+ b[cols]). Rows past N and columns past V
    hold the logits of row N - 1 / column V - 1 (finite, never meaningful): every caller masks them out.

    Padding rows and columns read the last valid row instead of being masked, so the only load mask is the one
    along H: the loads, their asynchronous copies and their registers do not depend on N or V, and the binary
    that the static check compiles at the model shapes is the one any N and V run (a row or column mask that
    the compiler could fold only when N or V is a multiple of 16 made ptxas spill at other sizes)."""
    h_rows = h_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_hn  # (BN, 1); int64: N * H > 2**31
    w_cols = tl.minimum(cols, V - 1)  # (BV,)
    w_rows = w_ptr + w_cols.to(tl.int64)[:, None] * stride_wv  # (BV, 1)
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + offs_h
        h_ok = (hs < H)[None, :]
        h_tile = tl.load(h_rows + hs[None, :], mask=h_ok, other=0.0)  # (BN, BH)
        w_tile = tl.load(w_rows + hs[None, :], mask=h_ok, other=0.0)  # (BV, BH)
        if UPCAST:
            h_tile = h_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(h_tile, tl.trans(w_tile), acc, input_precision=DOT_PREC)  # x += h @ W.T
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_cols).to(tl.float32)[None, :]
    return acc


# ----------------------------------------------------------------------------------------------- host rules


def dot_precision(dtype: torch.dtype, on_gpu: bool, allow_tf32: bool | None = None) -> str:
    """tl.dot input precision: "tf32" for fp32 inputs only where torch itself allows TF32 matmuls; "ieee"
    otherwise (exact fp32 products; for bf16/fp16 tiles the setting is ignored: they always use tensor cores)."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if dtype == torch.float32 and on_gpu and allow_tf32 else "ieee"


def needs_upcast(dtype: torch.dtype, interpreter: bool) -> bool:
    """The Triton interpreter (numpy) cannot tl.dot half-precision tiles; upcast them there, and only there."""
    return interpreter and dtype != torch.float32


def vocab_split(n_rows: int, vocab: int, row_block: int, v_align: int, programs_wanted: int) -> tuple[int, int]:
    """(splits, v_per_split): split V across programs until `programs_wanted` run for `n_rows` rows.

    `v_per_split` is a multiple of `v_align` (the largest BLOCK_V of a kernel's candidate configs), so that every
    candidate tiles a split exactly and the split (hence the output buffers) does not depend on the candidate."""
    n_tiles = triton.cdiv(vocab, v_align)
    row_blocks = triton.cdiv(max(n_rows, 1), row_block)
    splits = max(1, min(n_tiles, triton.cdiv(programs_wanted, row_blocks)))
    v_per_split = triton.cdiv(n_tiles, splits) * v_align
    return triton.cdiv(vocab, v_per_split), v_per_split
