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
     programs running at the same time read the same weight tiles (L2 reuse). Each program owns BLOCK_N rows and
     a contiguous run of vocabulary tiles of BLOCK_V ids; per tile it computes the logits (tiles.logits_tile,
     tiles.transform_tile: the student's formula), updates an online log-sum-exp, picks up z[target] when the
     target falls in the tile, and, when some row's tile maximum beats that row's current K-th value (rare once a
     peaked LLM distribution has been seen for a while), stages the fp32 tile in a per-program scratch buffer and
     merges it into the running top-K_PAD lists (K_PAD = next power of two >= k), SUB_N rows at a time:
         tile_top = bitonic_topk_ascending(tile_keys, K_PAD)   # bitonic top-k network over BLOCK_V keys
         running  = bitonic_merge_desc(max(running, tile_top)) # max of a descending and an ascending list is
                                                               # bitonic and holds the top K_PAD of their union
     The running lists live in the output buffer `[N, S, K_PAD]` (L2-resident while the program runs), the K-th
     values in registers. Key design choice: the selection works on SUB_N-row slices rather than on the whole
     BLOCK_N x BLOCK_V MMA tile, so the int64 keys never take a whole tile's registers (the earlier all-register
     design spilled at every GPU launch; see the static check in docs/kernels.md), while the MMA keeps the 64
     rows that sm_90's wgmma needs.
  2. host: the per-split lists are merged by `torch.topk` over `S * K_PAD` int64 keys and the per-split
     log-sum-exps by `torch.logsumexp` over S. S is chosen to fill the GPU when N is small.
Cost per logit, beyond the 2H flops of the matmul: about log2(K_PAD) * (log2(K_PAD) + 1) / 2 compare-and-swap
steps on int64 to sort runs, log2(K_PAD) more per halving of BLOCK_V down to K_PAD, and log2(K_PAD) for the
merge (about 35 at k=128 with BLOCK_V=128), only for tiles that are merged, plus one fp32 tile written to and
read from scratch; memory is O(N * S * K_PAD) int64 for the lists and one tile per program, never O(N * V).
At a 27B teacher's H=5376, V=262144 the matmul is 2.8 GFLOP per token against roughly 54 GFLOP for the rest of
the forward, so the whole kernel is a small share of the pass. Launch candidates: launch.plan_launch.

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
    make_options,
    mm_f32,
    rows_per_chunk,
    transform_logits,
    unflatten_rows,
)

try:
    import triton
    import triton.language as tl

    from grpo_kd.kernels.launch import DeviceProps, KernelCall, TileConfig, device_props, plan_launch, run_call
    from grpo_kd.kernels.tiles import dot_precision, logits_tile, needs_upcast, transform_tile
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
        for i in tl.static_range(LOG_N - LOG_K):  # width N >> (i + 1) after this halving (no constexpr name:
            # a compiled static_range may not rebind one)
            x = tl.reshape(tl.max(tl.reshape(x, [M, N >> (i + 1 + LOG_K), 2, 1 << LOG_K]), axis=2), [M, N >> (i + 1)])
            desc = ((tl.arange(0, N >> (i + 1)) >> LOG_K) & 1)[None, :]  # alternating; a single run is ascending
            x = _bitonic_merge_runs(x, desc, M, N >> (i + 1), LOG_K)
        return x

    @triton.jit
    def _topk_fwd_kernel(
        h_ptr,  # [N, H] bf16/fp16/fp32, row stride stride_hn, unit column stride
        w_ptr,  # [V, H] same dtype as hidden, row stride stride_wv, unit column stride
        b_ptr,  # [V] bias (unused unless HAS_BIAS)
        target_ptr,  # [N] int64 target ids (unused unless HAS_TARGET); negative = no target
        keys_ptr,  # out [N, S, K_PAD] int64: this split's running top-K_PAD keys, sorted descending (updated in place)
        scratch_ptr,  # [programs, BLOCK_N, BLOCK_V] fp32: one logits tile per program, staged for the selection
        split_lse_ptr,  # out [N, S] float32: log-sum-exp of z over this split's ids
        target_z_ptr,  # out [N] float32: z[target], written by the split that holds the target
        N, V, H,  # rows, vocabulary size, hidden size
        stride_hn, stride_wv,  # row strides of hidden and weight
        v_per_split,  # vocabulary ids per split, a multiple of BLOCK_V
        num_splits,  # S
        inv_temp,  # 1 / temperature
        softcap,  # soft cap (unused unless HAS_SOFTCAP)
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        K_PAD: tl.constexpr,  # power of two >= k
        LOG_K: tl.constexpr,  # log2(K_PAD)
        LOG_V: tl.constexpr,  # log2(BLOCK_V)
        BLOCK_N: tl.constexpr,  # rows per program (the MMA tile's rows)
        BLOCK_V: tl.constexpr,  # vocabulary ids per tile (a power of two >= K_PAD)
        BLOCK_H: tl.constexpr,  # hidden columns per tl.dot step
        SUB_N: tl.constexpr,  # rows per selection step (divides BLOCK_N)
        DOT_PREC: tl.constexpr,  # tiles.dot_precision
        UPCAST: tl.constexpr,  # tiles.needs_upcast
    ):
        # A kernel body: one program = BLOCK_N rows x one vocabulary split, streaming over its tiles.
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        out_row = rows.to(tl.int64) * num_splits + pid_s  # (BLOCK_N,) row of the [N * S, ...] outputs
        offs_v = tl.arange(0, BLOCK_V)
        offs_k = tl.arange(0, K_PAD)
        scratch = scratch_ptr + (pid_m * num_splits + pid_s).to(tl.int64) * (BLOCK_N * BLOCK_V)
        for r0 in range(0, BLOCK_N, SUB_N):  # running lists start empty: INT64_MIN everywhere
            sub = pid_m * BLOCK_N + r0 + tl.arange(0, SUB_N)
            sub_out = sub.to(tl.int64) * num_splits + pid_s
            empty = tl.full([SUB_N, K_PAD], -9223372036854775807 - 1, tl.int64)
            tl.store(keys_ptr + sub_out[:, None] * K_PAD + offs_k[None, :], empty, mask=(sub < N)[:, None])
        tl.debug_barrier()

        if HAS_TARGET:
            target = tl.load(target_ptr + rows, mask=row_ok, other=-1)  # (BLOCK_N,)
        target_z = tl.zeros([BLOCK_N], dtype=tl.float32)
        run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)  # online log-sum-exp: running max m
        run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)  # and sum of exp(z - m)
        kth_z = tl.full([BLOCK_N], float("-inf"), tl.float32)  # z of each row's current K-th key (-inf: not full)
        v_start = pid_s * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + offs_v  # (BLOCK_V,) vocabulary ids of this tile
            col_ok = cols < V
            x = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST)  # (BLOCK_N, BLOCK_V)
            z, _ = transform_tile(x, inv_temp, softcap, HAS_SOFTCAP, False)
            z = tl.where(col_ok[None, :], z, float("-inf"))  # ids past V never count
            z = tl.where(z == 0.0, 0.0, z)  # -0.0 -> +0.0

            # online log-sum-exp: m' = max(m, max z); s' = s * exp(m - m') + sum exp(z - m')
            tile_max = tl.max(z, axis=1)
            new_max = tl.maximum(run_max, tile_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
            if HAS_TARGET:
                target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)

            # A tile changes a row's list only if its maximum beats the row's K-th value: ids grow along the
            # split, so an equal value has a higher id and loses the tie. Common late in a peaked distribution.
            beats = (tile_max > kth_z) & row_ok
            if tl.max(beats.to(tl.int32), axis=0) > 0:
                tl.store(scratch + tl.arange(0, BLOCK_N)[:, None] * BLOCK_V + offs_v[None, :], z)
                tl.debug_barrier()  # the tile is visible to every thread of the program
                for r0 in range(0, BLOCK_N, SUB_N):
                    _merge_rows(scratch, keys_ptr, r0, pid_m * BLOCK_N + r0, cols, N, num_splits, pid_s,
                                K_PAD, LOG_K, LOG_V, BLOCK_V, SUB_N)
                tl.debug_barrier()
                kth = tl.load(keys_ptr + out_row * K_PAD + (K_PAD - 1), mask=row_ok, other=0)  # (BLOCK_N,)
                ordered = (kth >> 32).to(tl.int32)
                kth_z = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
                kth_z = tl.where(kth == -9223372036854775807 - 1, float("-inf"), kth_z)

        tl.store(split_lse_ptr + out_row, run_max + tl.log(run_sum), mask=row_ok)
        if HAS_TARGET:
            mine = (target >= v_start) & (target < v_end)
            tl.store(target_z_ptr + rows, target_z, mask=row_ok & mine)

    @triton.jit
    def _merge_rows(scratch, keys_ptr, r0, first_row, cols, N, num_splits, pid_s,
                    K_PAD: tl.constexpr, LOG_K: tl.constexpr, LOG_V: tl.constexpr, BLOCK_V: tl.constexpr,
                    SUB_N: tl.constexpr):
        # Merge rows r0 .. r0 + SUB_N of the staged tile (SUB_N, BLOCK_V) into their running lists in keys_ptr.
        offs_v = tl.arange(0, BLOCK_V)
        offs_k = tl.arange(0, K_PAD)
        sub = first_row + tl.arange(0, SUB_N)  # (SUB_N,) global rows
        sub_ok = sub < N
        z = tl.load(scratch + (r0 + tl.arange(0, SUB_N))[:, None] * BLOCK_V + offs_v[None, :])  # (SUB_N, BV)
        # pack (z, id) into keys that sort by z desc, then id asc
        bits = z.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        keys = (ordered << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]  # (SUB_N, BLOCK_V)
        where = keys_ptr + (sub.to(tl.int64) * num_splits + pid_s)[:, None] * K_PAD + offs_k[None, :]
        running = tl.load(where, mask=sub_ok[:, None], other=-9223372036854775807 - 1)  # (SUB_N, K_PAD) desc
        if tl.max(tl.max(keys, axis=1) > tl.min(running, axis=1), axis=0):
            tile_top = _topk_ascending(keys, SUB_N, BLOCK_V, LOG_V, LOG_K)  # (SUB_N, K_PAD) ascending
            # running is descending, tile_top ascending: their elementwise max is bitonic and holds the K_PAD
            # largest of both lists; one merge sorts it descending again
            all_desc = tl.full([1, K_PAD], 1, tl.int32)
            running = _bitonic_merge_runs(tl.maximum(running, tile_top), all_desc, SUB_N, K_PAD, LOG_K)
            tl.debug_barrier()  # every thread has read the old lists before any is overwritten
            tl.store(where, running, mask=sub_ok[:, None])


@dataclass(frozen=True)
class TopkLaunch:
    """Fixed launch sizes of `_topk_fwd_kernel` (tests); `num_splits=None` picks S to fill the device. Without
    one, `launch.plan_launch` picks the candidates (autotuned on a GPU)."""

    block_m: int
    block_v: int
    block_h: int
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def config(self) -> TileConfig:
        return TileConfig(self.block_m, self.block_v, self.block_h, self.num_warps, self.num_stages,
                          sub_n=min(self.block_m, 16))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def topk_call(hidden, weight, k: int, bias, targets, temperature: float, softcap, props: DeviceProps,
              launch: TopkLaunch | None = None, allow_tf32: bool | None = None):
    """(KernelCall of `_topk_fwd_kernel`, (keys [N, S, K_PAD], split_lse [N, S], target_z [N])). The tensors may
    live on the meta device (static check)."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    k_pad = _next_pow2(k)
    fixed = launch.config() if launch is not None else None
    if fixed is not None and (fixed.block_v < k_pad or fixed.block_v & (fixed.block_v - 1)):
        raise GrpoKdError(f"block_v must be a power of two >= {k_pad}, got {fixed.block_v}")
    plan = plan_launch("topk", n_rows, hidden_size, vocab, hidden.dtype, props, k=k, launch=fixed,
                       splits=launch.num_splits if launch is not None else None)
    dev = hidden.device
    keys = torch.empty((n_rows, plan.splits, k_pad), device=dev, dtype=torch.int64)
    split_lse = torch.empty((n_rows, plan.splits), device=dev, dtype=torch.float32)
    target_z = torch.zeros((n_rows,), device=dev, dtype=torch.float32)
    scratch_elems = max(triton.cdiv(n_rows, c.block_n) * c.block_n * c.block_v for c in plan.configs) * plan.splits
    scratch = torch.empty((scratch_elems,), device=dev, dtype=torch.float32)  # one tile per program
    args = dict(h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else split_lse,
                target_ptr=targets if targets is not None else keys, keys_ptr=keys, scratch_ptr=scratch,
                split_lse_ptr=split_lse, target_z_ptr=target_z, N=n_rows, V=vocab, H=hidden_size,
                stride_hn=hidden.stride(0), stride_wv=weight.stride(0), v_per_split=plan.v_per_split,
                num_splits=plan.splits, inv_temp=1.0 / temperature, softcap=float(softcap) if softcap else 1.0)
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_TARGET=targets is not None,
                 K_PAD=k_pad, LOG_K=k_pad.bit_length() - 1,
                 DOT_PREC=dot_precision(hidden.dtype, not props.interpreter, allow_tf32),
                 UPCAST=needs_upcast(hidden.dtype, props.interpreter))
    grid = lambda cfg: (triton.cdiv(n_rows, cfg.block_n), plan.splits)  # noqa: E731
    return KernelCall(_topk_fwd_kernel, args, flags, plan, grid), (keys, split_lse, target_z)


def _topk_triton(hidden, weight, k, bias, targets, temperature, softcap, launch):
    """Host launcher. hidden [N, H], weight [V, H], targets [N] int64 | None -> (keys [N, k], lse [N], target_z)."""
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    props = device_props(hidden.device)
    call, (keys, split_lse, target_z) = topk_call(hidden, weight, k, bias, targets, temperature, softcap, props,
                                                  launch)
    run_call(call, props)
    n_rows, splits = split_lse.shape
    if splits == 1:
        top = keys[:, 0, :k]  # (N, k) already sorted
    else:
        top = torch.topk(keys.view(n_rows, -1), k, dim=1, sorted=True).values  # (N, k)
    lse = torch.logsumexp(split_lse, dim=1)  # (N,)
    return top, lse, target_z


# ----------------------------------------------------------------------------------------------- torch twin


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
        x = mm_f32(hidden[rows], weight_t)  # (rows, V) float32
        if bias is not None:
            x += bias.float()
        z = transform_logits(x, temperature, softcap, inplace=True)  # (rows, V), in x's buffer
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


__all__ = ["linear_topk", "encode_keys", "decode_keys", "TopkLaunch", "MAX_TRITON_K"]
