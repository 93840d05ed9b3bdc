"""`linear_topk`: the teacher pass's kernel. Top-k token ids and log-probs, the log-sum-exp, and the exact
log-prob of the sampled token, straight from hidden states and the LM-head weight, with no `N x V` logits.

    x = hidden @ weight.T + bias ; z = softcap * tanh(x / softcap) / temperature   (grpo_kd.kernels._common)
    lse = logsumexp_v z[v]
    topk_logprobs = (the k largest z) - lse       sorted descending, ids alongside
    target_logprob = z[target] - lse

No gradient: the teacher is frozen, so there is no autograd Function; both paths run under `torch.no_grad()`.

Key design choice: **one pass over the vocabulary with a running top-k carried as packed 64-bit keys.**
Each logit z (float32) and its id v are packed into one int64 whose signed order is "larger z first, then lower
id first":

    key = (ordered_int32(z) << 32) | (2**31 - 1 - v)
    ordered_int32(z) = bits(z) if bits(z) >= 0 else bits(z) ^ 0x7FFFFFFF   # monotone in z for non-NaN floats

so a top-k over keys is a top-k over logits with a fixed tie-break (**ties go to the lower id**), the id travels
with its value through Triton's bitonic networks (which sort values, not (value, index) pairs), and the float
value is recovered bit-exactly. -0.0 is folded to +0.0 first so that the two zeros tie.

Triton path (two stages):
  1. `_topk_fwd_kernel`, grid `(row blocks, vocab splits)`; the row-block index varies fastest so that the
     programs running at the same time read the same weight tiles (L2 reuse). Each program owns BLOCK_M rows and
     a contiguous run of vocabulary tiles of BLOCK_V ids; per tile it computes the logits with `tl.dot` over H
     (float32 accumulation), applies the transform, updates an online log-sum-exp, picks up z[target] when the
     target falls in the tile, and merges the tile into the running top-K_PAD (K_PAD = next power of two >= k):
         tile_top = bitonic_topk_ascending(tile_keys, K_PAD)   # bitonic top-k network over BLOCK_V keys
         running  = bitonic_merge_desc(max(running, tile_top)) # max of a descending and an ascending list is
                                                               # bitonic and holds the top K_PAD of their union
     The merge is skipped for a whole tile when no row's tile maximum beats that row's current K-th key, which
     is the common case once a peaked (LLM) distribution has been seen for a while.
  2. host: the per-split lists `[N, S, K_PAD]` are merged by `torch.topk` over `S * K_PAD` int64 keys and the
     per-split log-sum-exps by `torch.logsumexp` over S. S is chosen to fill the GPU when N is small.
Cost per logit, beyond the 2H flops of the matmul: about log2(K_PAD) * (log2(K_PAD) + 1) / 2 compare-and-swap
steps on int64 to sort runs, log2(K_PAD) more per halving of BLOCK_V down to K_PAD, and log2(K_PAD) for the
merge (about 35 at k=128 with BLOCK_V=128), only for tiles that are not skipped; memory is O(N * S * K_PAD)
int64 for the split lists, never O(N * V). At a 27B teacher's H=5376, V=262144 the matmul is 2.8 GFLOP per
token against roughly 54 GFLOP for the rest of the forward, so the whole kernel is a small share of the pass.
The launch sizes are untuned (no GPU in the session that wrote this); see docs/kernels.md.

Torch twin (CPU path and oracle): row chunks sized by a byte budget; per chunk the full `[rows, V]` logits
in float32, `torch.logsumexp`, and `torch.topk`; rows with an exact tie at or inside their top k are redone
over the same packed int64 keys, so both paths break ties alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels import _common
from grpo_kd.kernels._common import (
    check_ids,
    check_linear,
    flatten_hidden,
    flatten_rows,
    interpreter_on,
    make_options,
    rows_per_chunk,
    transform_logits,
    unflatten_rows,
)

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

MAX_TRITON_K = 256  # running top-K_PAD lives in registers: [BLOCK_M, K_PAD] int64
_ID_FLIP = 0x7FFFFFFF  # low 32 bits of a key hold (2**31 - 1 - id): larger for lower ids
_LOW_MASK = 0xFFFFFFFF
_TWIN_BYTES_PER_LOGIT = 12  # torch twin scratch per logit: z f32, a bool/f32 temporary, (tied rows) int64 keys


# ----------------------------------------------------------------------------------------------- key packing


def encode_keys(z: torch.Tensor, first_id: int = 0) -> torch.Tensor:
    """float32 logits `[rows, V']` (ids first_id..first_id+V'-1) -> int64 keys ordered by (z desc, id asc)."""
    z = torch.where(z == 0, torch.zeros_like(z), z)  # -0.0 -> +0.0: the two zeros tie
    bits = z.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ _ID_FLIP, bits).to(torch.int64)  # (rows, V')
    ids = torch.arange(first_id, first_id + z.shape[-1], device=z.device, dtype=torch.int64)  # (V',)
    return (ordered << 32) | (_ID_FLIP - ids)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (ids int32, z float32), both of the keys' shape; exact inverse of `encode_keys`."""
    ids = (_ID_FLIP - (keys & _LOW_MASK)).to(torch.int32)
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ _ID_FLIP, ordered)
    return ids, bits.view(torch.float32)


# ----------------------------------------------------------------------------------------------- Triton kernel

if triton is not None:

    # Bitonic networks over the last dim of a [M, N] int64 tile (N a power of two). Each compare-and-swap is a
    # max and a min over a size-2 axis of a reshaped view, rather than the xor-swap of `tl.sort`: the same
    # network, but one the Triton CPU interpreter runs with vectorised numpy reductions (its generic reduce,
    # which `tl.sort` / `tl.topk` / `tl.flip` go through, loops in Python over elements).

    @triton.jit
    def _compare_and_swap(x, desc, M: tl.constexpr, N: tl.constexpr, J: tl.constexpr):
        # x (M, N); desc (1, N) int32, 1 where the run holding that position is to be sorted descending.
        # Elements 2**J apart are compared; the smaller goes left in ascending runs, right in descending ones.
        y = tl.reshape(x, [M, N >> (J + 1), 2, 1 << J])  # (M, pairs, 2, 2**J)
        hi = tl.max(y, axis=2, keep_dims=True)  # (M, pairs, 1, 2**J)
        lo = tl.min(y, axis=2, keep_dims=True)
        right = tl.reshape(tl.arange(0, 2), [1, 1, 2, 1])  # 0 = left, 1 = right
        d = tl.reshape(desc, [1, N >> (J + 1), 2, 1 << J])
        y = tl.where((right ^ d) != 0, hi, lo)  # (M, pairs, 2, 2**J)
        return tl.reshape(y, [M, N])

    @triton.jit
    def _bitonic_merge_runs(x, desc, M: tl.constexpr, N: tl.constexpr, LOG_RUN: tl.constexpr):
        # Sort every bitonic run of 2**LOG_RUN elements of x (M, N) into the direction given by desc.
        for jj in tl.static_range(LOG_RUN):
            x = _compare_and_swap(x, desc, M, N, LOG_RUN - 1 - jj)
        return x

    @triton.jit
    def _topk_ascending(x, M: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
        # The 2**LOG_K largest of each row of x (M, N), sorted ascending: (M, 2**LOG_K). Bitonic top-k:
        # sort runs of 2**LOG_K in alternating directions, then repeatedly take the elementwise max of
        # neighbouring runs (an ascending and a descending run: bitonic, holding the top of both) and merge.
        for s in tl.static_range(1, LOG_K + 1):
            desc = ((tl.arange(0, N) >> s) & 1)[None, :]  # runs of 2**s alternate asc / desc
            x = _bitonic_merge_runs(x, desc, M, N, s)
        for i in tl.static_range(LOG_N - LOG_K):
            n: tl.constexpr = N >> (i + 1)
            x = tl.reshape(tl.max(tl.reshape(x, [M, n >> LOG_K, 2, 1 << LOG_K]), axis=2), [M, n])
            desc = ((tl.arange(0, n) >> LOG_K) & 1)[None, :]  # alternating; a single run is ascending
            x = _bitonic_merge_runs(x, desc, M, n, LOG_K)
        return x

    @triton.jit
    def _topk_fwd_kernel(
        hidden_ptr,  # [N, H] bf16/fp16/fp32, row stride stride_hn, unit column stride
        weight_ptr,  # [V, H] same dtype as hidden, row stride stride_wv, unit column stride
        bias_ptr,  # [V] float32 (unused unless HAS_BIAS)
        target_ptr,  # [N] int64 target ids (unused unless HAS_TARGET); negative = no target
        keys_ptr,  # out [N, S, K_PAD] int64: this split's running top-K_PAD keys, sorted descending
        split_lse_ptr,  # out [N, S] float32: log-sum-exp of z over this split's ids
        target_z_ptr,  # out [N] float32: z[target], written by the split that holds the target
        N, H, V,  # rows, hidden size, vocabulary size
        stride_hn, stride_wv,  # row strides of hidden and weight
        tiles_per_split,  # vocabulary tiles of BLOCK_V ids per split
        num_splits,  # S
        inv_temperature,  # 1 / temperature
        softcap,  # soft cap (unused unless HAS_SOFTCAP)
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        K_PAD: tl.constexpr,  # power of two >= k
        LOG_K: tl.constexpr,  # log2(K_PAD)
        LOG_V: tl.constexpr,  # log2(BLOCK_V)
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_V: tl.constexpr,  # vocabulary ids per tile (a power of two >= K_PAD)
        BLOCK_H: tl.constexpr,  # hidden columns per tl.dot step
        INPUT_PRECISION: tl.constexpr,  # "ieee": exact float32 products; "tf32" (ignored for bf16/fp16 inputs)
    ):
        # A kernel body: one program = BLOCK_M rows x one vocabulary split, streaming over its tiles.
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        offs_v = tl.arange(0, BLOCK_V)  # (BLOCK_V,)

        if HAS_TARGET:
            target = tl.load(target_ptr + rows64, mask=row_ok, other=-1)  # (BLOCK_M,)
        target_z = tl.zeros([BLOCK_M], dtype=tl.float32)
        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # online log-sum-exp: running max m
        run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # and sum of exp(z - m)
        running = tl.full([BLOCK_M, K_PAD], -9223372036854775807 - 1, tl.int64)  # top-K_PAD keys, descending

        num_tiles = tl.cdiv(V, BLOCK_V)
        tile_begin = pid_s * tiles_per_split
        tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
        for tile in range(tile_begin, tile_end):
            cols = tile * BLOCK_V + offs_v  # (BLOCK_V,) vocabulary ids of this tile
            col_ok = cols < V
            # x = hidden @ weight[cols].T, float32 accumulation over H
            acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h_ok = (h0 + offs_h) < H
                hid = tl.load(
                    hidden_ptr + rows64[:, None] * stride_hn + (h0 + offs_h)[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0,
                )  # (BLOCK_M, BLOCK_H)
                w = tl.load(
                    weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + (h0 + offs_h)[None, :],
                    mask=col_ok[:, None] & h_ok[None, :], other=0.0,
                )  # (BLOCK_V, BLOCK_H)
                acc = tl.dot(hid, tl.trans(w), acc, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_V)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
            if HAS_SOFTCAP:
                # softcap * tanh(x / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1): saturates cleanly at +-1
                acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0))
            z = acc * inv_temperature
            z = tl.where(col_ok[None, :], z, float("-inf"))  # ids past V never count
            z = tl.where(z == 0.0, 0.0, z)  # -0.0 -> +0.0

            # online log-sum-exp: m' = max(m, max z); s' = s * exp(m - m') + sum exp(z - m')
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
            if HAS_TARGET:
                target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)

            # pack (z, id) into keys that sort by z desc, then id asc
            bits = z.to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
            keys = (ordered << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]  # (BLOCK_M, BLOCK_V)
            # merge only if some row has a key above its current K-th key (running is sorted: min = K-th)
            beats = tl.max(keys, axis=1) > tl.min(running, axis=1)  # (BLOCK_M,)
            if tl.max(beats.to(tl.int32), axis=0) > 0:
                tile_top = _topk_ascending(keys, BLOCK_M, BLOCK_V, LOG_V, LOG_K)  # (BLOCK_M, K_PAD) ascending
                # running is descending, tile_top ascending: their elementwise max is bitonic and holds the
                # K_PAD largest of both lists; one merge sorts it descending again
                all_desc = tl.full([1, K_PAD], 1, tl.int32)
                running = _bitonic_merge_runs(tl.maximum(running, tile_top), all_desc, BLOCK_M, K_PAD, LOG_K)

        offs_k = tl.arange(0, K_PAD)
        out_row = rows64 * num_splits + pid_s  # (BLOCK_M,) row of the [N * S, ...] outputs
        tl.store(keys_ptr + out_row[:, None] * K_PAD + offs_k[None, :], running, mask=row_ok[:, None])
        tl.store(split_lse_ptr + out_row, run_max + tl.log(run_sum), mask=row_ok)
        if HAS_TARGET:
            mine = (target >= tile_begin * BLOCK_V) & (target < tile_end * BLOCK_V)
            tl.store(target_z_ptr + rows64, target_z, mask=row_ok & mine)


@dataclass(frozen=True)
class TopkLaunch:
    """Launch sizes of `_topk_fwd_kernel`; `num_splits=None` picks S to fill the device."""

    block_m: int
    block_v: int
    block_h: int
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_launch(n_rows: int, hidden_size: int, k: int, device: torch.device) -> TopkLaunch:
    """Untuned defaults: small blocks for the CPU interpreter, register-aware blocks on a GPU."""
    k_pad = _next_pow2(k)
    block_h = max(16, min(64, _next_pow2(hidden_size)))
    if device.type != "cuda":  # the interpreter: few, large tiles (its cost is per operation, not per element)
        block_m = max(16, min(64, _next_pow2(n_rows)))
        return TopkLaunch(block_m=block_m, block_v=max(256, k_pad), block_h=block_h)
    # [BLOCK_M, K_PAD] + [BLOCK_M, BLOCK_V] int64 keys and a float32 accumulator must fit in registers
    block_m = 64 if k_pad <= 64 else 32
    return TopkLaunch(block_m=block_m, block_v=max(128, k_pad), block_h=block_h, num_warps=8, num_stages=3)


def _num_splits(launch: TopkLaunch, n_rows: int, num_tiles: int, device: torch.device) -> int:
    if launch.num_splits is not None:
        return max(1, min(launch.num_splits, num_tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n_rows, launch.block_m)
    return max(1, min(num_tiles, triton.cdiv(4 * sms, row_blocks)))


def _topk_triton(hidden, weight, k, bias, targets, temperature, softcap, launch):
    """Host launcher. hidden [N, H], weight [V, H], targets [N] int64 | None -> (keys [N, k], lse [N], target_z)."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    k_pad = _next_pow2(k)
    launch = launch or default_launch(n_rows, hidden_size, k, hidden.device)
    if launch.block_v < k_pad or launch.block_v & (launch.block_v - 1):
        raise GrpoKdError(f"block_v must be a power of two >= {k_pad}, got {launch.block_v}")
    num_tiles = triton.cdiv(vocab, launch.block_v)
    splits = _num_splits(launch, n_rows, num_tiles, hidden.device)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split

    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    if interpreter_on() and hidden.dtype != torch.float32:  # numpy cannot tl.dot half tiles: upcast there
        hidden, weight = hidden.float(), weight.float()
    # float32 inputs: exact products unless torch itself allows TF32 matmuls
    tf32 = hidden.is_cuda and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if hidden.dtype != torch.float32 or tf32 else "ieee"
    keys = torch.empty((n_rows, splits, k_pad), device=hidden.device, dtype=torch.int64)
    split_lse = torch.empty((n_rows, splits), device=hidden.device, dtype=torch.float32)
    target_z = torch.zeros((n_rows,), device=hidden.device, dtype=torch.float32)
    bias32 = bias.float().contiguous() if bias is not None else split_lse
    grid = (triton.cdiv(n_rows, launch.block_m), splits)
    _topk_fwd_kernel[grid](
        hidden, weight, bias32, targets if targets is not None else keys, keys, split_lse, target_z,
        n_rows, hidden_size, vocab, hidden.stride(0), weight.stride(0), tiles_per_split, splits,
        1.0 / temperature, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_TARGET=targets is not None,
        K_PAD=k_pad, LOG_K=k_pad.bit_length() - 1, LOG_V=launch.block_v.bit_length() - 1,
        BLOCK_M=launch.block_m, BLOCK_V=launch.block_v, BLOCK_H=launch.block_h,
        INPUT_PRECISION=precision,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits == 1:
        top = keys[:, 0, :k]  # (N, k) already sorted
    else:
        top = torch.topk(keys.view(n_rows, splits * k_pad), k, dim=1, sorted=True).values  # (N, k)
    lse = torch.logsumexp(split_lse, dim=1)  # (N,)
    return top, lse, target_z


# ----------------------------------------------------------------------------------------------- torch twin


def _mm_f32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half-precision CUDA matmul with a float32 result (cuBLAS out_dtype; older torch: round once, upcast)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return (a @ b).float()


def _topk_torch(hidden, weight, k, bias, targets, temperature, softcap, chunk_bytes):
    """Chunked twin. hidden [N, H], weight [V, H] -> (keys [N, k] int64, lse [N] f32, target_z [N] f32)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    # float32 logits need float32 operands on the CPU (no bf16 -> f32 matmul there); upcast the weight once
    compute = torch.float32 if hidden.device.type == "cpu" or hidden.dtype == torch.float32 else None
    weight_t = (weight.float() if compute else weight).t()  # (H, V)
    top = torch.empty((n_rows, k), device=hidden.device, dtype=torch.int64)
    lse = torch.empty((n_rows,), device=hidden.device, dtype=torch.float32)
    target_z = torch.zeros((n_rows,), device=hidden.device, dtype=torch.float32)
    step = rows_per_chunk(vocab, chunk_bytes, _TWIN_BYTES_PER_LOGIT)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        if compute:
            x = hidden[rows].float() @ weight_t  # (rows, V) float32
        else:  # bf16/fp16 on a GPU: float32 output of the low-precision matmul
            x = _mm_f32_out(hidden[rows], weight_t)  # (rows, V)
        if bias is not None:
            x += bias.float()
        z = transform_logits(x, temperature, softcap)  # (rows, V)
        lse[rows] = torch.logsumexp(z, dim=1)
        if targets is not None:
            t = targets[rows]
            picked = z.gather(1, t.clamp(min=0)[:, None])[:, 0]  # (rows,)
            target_z[rows] = torch.where(t >= 0, picked, torch.zeros_like(picked))
        top[rows] = _chunk_topk_keys(z, k)  # (rows, k)
    return top, lse, target_z


def _chunk_topk_keys(z: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k keys of float32 logits z (rows, V), sorted, ties to the lower id. A float top-(k+1) decides every
    row without an exact tie at or inside its top k; only the other rows go through the int64 keys."""
    extra = min(k + 1, z.shape[1])  # one more than k: a tie at the boundary shows as values[k-1] == values[k]
    values, ids = torch.topk(z, extra, dim=1, sorted=True)  # (rows, k or k + 1)
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)  # (rows,) a tie inside the top k or at its boundary
    values, ids = values[:, :k], ids[:, :k]
    z_top = torch.where(values == 0, torch.zeros_like(values), values)  # -0.0 -> +0.0, as in encode_keys
    bits = z_top.view(torch.int32)
    keys = (torch.where(bits < 0, bits ^ _ID_FLIP, bits).to(torch.int64) << 32) | (_ID_FLIP - ids)
    if tied.any():
        keys[tied] = torch.topk(encode_keys(z[tied]), k, dim=1, sorted=True).values
    return keys


# ----------------------------------------------------------------------------------------------- public API


def _check_k(k: int, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GrpoKdError(f"k must be a positive integer, got {k!r}")
    if k > vocab:
        raise GrpoKdError(f"k={k} exceeds the vocabulary size V={vocab}")
    return k


def _flat_targets(target_ids: torch.Tensor | None, lead: tuple[int, ...], vocab: int, device) -> torch.Tensor | None:
    if target_ids is None:
        return None
    targets = flatten_rows(target_ids, lead, "target_ids")  # (N,)
    if targets.device != device:
        raise GrpoKdError(f"target_ids is on {targets.device} but hidden is on {device}")
    present = targets >= 0  # a negative id means "no target"; kept negative for the kernels
    return torch.where(present, check_ids(targets, vocab, "target_ids", valid=present), -1)


@torch.no_grad()
def linear_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    target_ids: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_bytes: int | None = None,
    launch: TopkLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of the transformed logits of `hidden @ weight.T (+ bias)`, normalised over the full vocabulary.

    hidden `[N, H]` or `[B, T, H]`; weight `[V, H]`; bias `[V]`; target_ids `[N]` / `[B, T]` integer ids
    (a negative id means "no target here" and yields 0.0). Returns, with `...` the leading shape of hidden:
      ids             int32   `[..., k]`  sorted by log-prob, largest first; equal log-probs: lower id first
      logprobs        float32 `[..., k]`  z[id] - lse
      lse             float32 `[...]`     logsumexp over all V of z
      target_logprobs float32 `[...]`     z[target] - lse, or None without target_ids
    No gradient flows. `chunk_bytes` bounds the torch twin's scratch (default `_common.DEFAULT_CHUNK_BYTES`);
    `launch` overrides the Triton launch sizes.
    """
    flat, lead = flatten_hidden(hidden)  # (N, H)
    check_linear(flat, weight, bias)
    vocab = weight.shape[0]
    k = _check_k(k, vocab)
    options = make_options(temperature, softcap, impl, flat, weight, bias)
    targets = _flat_targets(target_ids, lead, vocab, flat.device)
    if flat.shape[0] == 0:
        top = torch.empty((0, k), device=flat.device, dtype=torch.int64)
        lse = target_z = torch.empty((0,), device=flat.device, dtype=torch.float32)
    elif options.impl == "triton":
        if k > MAX_TRITON_K:
            raise GrpoKdError(f"impl='triton' supports k <= {MAX_TRITON_K}, got k={k}; use impl='torch'")
        top, lse, target_z = _topk_triton(
            flat, weight, k, bias, targets, options.temperature, options.softcap, launch
        )
    else:
        top, lse, target_z = _topk_torch(
            flat, weight, k, bias, targets, options.temperature, options.softcap,
            chunk_bytes or _common.DEFAULT_CHUNK_BYTES,
        )
    ids, top_z = decode_keys(top)  # (N, k) int32, (N, k) float32
    logprobs = top_z - lse[:, None]
    target_logprobs = None
    if targets is not None:
        target_logprobs = torch.where(targets >= 0, target_z - lse, torch.zeros_like(lse))
    return (
        unflatten_rows(ids, lead),
        unflatten_rows(logprobs, lead),
        unflatten_rows(lse, lead),
        unflatten_rows(target_logprobs, lead) if target_logprobs is not None else None,
    )


__all__ = ["linear_topk", "encode_keys", "decode_keys", "TopkLaunch", "default_launch", "MAX_TRITON_K"]
