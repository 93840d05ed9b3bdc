"""Launch planning: the one function that turns shapes, dtype and a device's properties into a kernel launch.

    plan_launch(kernel, n_rows, hidden, vocab, dtype, props, k=...) -> Launch(configs, splits, v_per_split)

`configs` is the short list of tile configurations (BLOCK_N x BLOCK_V x BLOCK_H, warps, pipeline stages) that a
GPU autotunes over (`triton.autotune`, keyed on the sizes and flags); every entry passes the static check
(`grpo-kd bench kernels --static`: no register spill, shared memory within the per-block limit, tensor-core MMA
for half inputs). The CPU interpreter gets a single small config. `splits` is the vocabulary work split
(tiles.vocab_split), the same for every candidate so that output buffers do not depend on the choice.

Key design choice: the real launchers (stats.py, dense_grad.py, topk.py) and the static check call the same
`plan_launch` and the same per-kernel `*_call` builders; the static check only swaps the live device's
properties for the A100 / H100 / B200 ones below (data, not a GPU) and real tensors for meta tensors. What it
compiles is therefore exactly what a GPU would run.

Why these tiles. An fp32 [BLOCK_N, BLOCK_V] tile costs BLOCK_N * BLOCK_V / (32 * num_warps) registers per thread,
and the epilogues (online log-sum-exp, gradient, top-k keys as int64) hold two or three such tiles at once, so
each kernel keeps about 64 fp32 tile elements or fewer per thread (32 for the longest epilogues on sm_90).
sm_90's wgmma needs 64 rows per warp group. Two launch classes: 16-element aligned rows (hidden % 16 == 0, every
model) get the autotuned lists; unaligned rows get one small one-stage tile (`aligned`). The tile loads mask only
along H (tiles.logits_tile), so the main loop does not depend on N or V; their divisibility by 16 still shapes the
epilogue's masks and dense_grad's store, which the static check's odd shapes (N = 37, V = 1031) cover.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels.tiles import vocab_split

KERNELS = ("stats", "jsd_rest", "dense_grad", "topk")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # by the names jobs use


@dataclass(frozen=True)
class DeviceProps:
    """What a launch depends on, of one device. `arch` = compute capability x 10 (80, 90, 100); 0 = the CPU
    interpreter."""

    name: str
    arch: int
    sm_count: int
    smem_per_block: int  # bytes a block may opt in to
    smem_per_sm: int  # bytes per multiprocessor
    regs_per_sm: int = 65536  # 32-bit registers per multiprocessor
    max_warps_per_sm: int = 64
    max_regs_per_thread: int = 255

    @property
    def interpreter(self) -> bool:
        return self.arch == 0


A100 = DeviceProps("A100 (sm_80)", 80, 108, smem_per_block=166912, smem_per_sm=167936)
H100 = DeviceProps("H100 SXM (sm_90)", 90, 132, smem_per_block=232448, smem_per_sm=233472)
B200 = DeviceProps("B200 (sm_100)", 100, 148, smem_per_block=232448, smem_per_sm=233472)
INTERPRETER = DeviceProps("CPU interpreter", 0, 1, smem_per_block=2**30, smem_per_sm=2**30)
PRESETS = {80: A100, 90: H100, 100: B200}


def device_props(device: torch.device) -> DeviceProps:
    """The properties of a live CUDA device, or INTERPRETER for anything else."""
    if device.type != "cuda":
        return INTERPRETER
    p = torch.cuda.get_device_properties(device)
    return DeviceProps(
        name=p.name, arch=p.major * 10 + p.minor, sm_count=p.multi_processor_count,
        smem_per_block=getattr(p, "shared_memory_per_block_optin", 0) or PRESETS.get(p.major * 10, H100).smem_per_block,
        smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", 0) or PRESETS.get(p.major * 10, H100).smem_per_sm,
        regs_per_sm=getattr(p, "regs_per_multiprocessor", 0) or 65536,
        max_warps_per_sm=(getattr(p, "max_threads_per_multi_processor", 0) or 2048) // 32,
    )


@dataclass(frozen=True)
class TileConfig:
    """One candidate: tile sizes (BLOCK_N rows x BLOCK_V ids x BLOCK_H hidden), warps, pipeline stages, and for
    topk the row sub-block of the selection (SUB_N)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 2
    sub_n: int = 0  # topk only
    maxnreg: int | None = None  # register budget given to ptxas (None: its own occupancy heuristic)

    def meta(self) -> dict:
        out = dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h)
        if self.sub_n:  # topk: the selection's row slice and log2(BLOCK_V) for its sorting network
            out.update(SUB_N=self.sub_n, LOG_V=self.block_v.bit_length() - 1)
        return out

    def label(self) -> str:
        sub = f" sub{self.sub_n}" if self.sub_n else ""
        regs = f" r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.block_n}x{self.block_v}x{self.block_h} w{self.num_warps} s{self.num_stages}{sub}{regs}"

    def options(self) -> dict:
        """Compile options: warps, stages and (when set) the register budget."""
        out = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg:
            out["maxnreg"] = self.maxnreg
        return out


@dataclass(frozen=True)
class Launch:
    """A planned launch: candidate configs (the first is the default) and the vocabulary split."""

    configs: tuple[TileConfig, ...]
    splits: int
    v_per_split: int


# (kernel, dtype class, architecture family) -> candidates. "half" = bf16/fp16 (tensor cores), "fp32" = exact fp32
# products (FMA; TF32 when torch allows it). sm_100 uses the sm_90 lists. Every entry passes the static check
# (docs/kernels.md has the table). The kernels with the longest epilogues (jsd_rest's mixture logarithm,
# dense_grad's gradient) keep at most 32 fp32 tile elements per thread on sm_90 (64 x 128 over 8 warps, not 4):
# at 64 per thread ptxas spilled at 255 registers. fp32 FMA products hold BLOCK_H operand columns per thread, so
# the fp32 stats tiles take BLOCK_H = 16 (at 32, the lse-only variant spilled 8-16 bytes of loop-invariant
# values across the vocabulary loop with every register budget), and so does jsd_rest's small sm_80 fp32 tile
# (32 x 64 x 32 spilled 16 bytes in the plain variant at 96 registers).
_T = TileConfig
GPU_CONFIGS: dict[tuple[str, str, int], tuple[TileConfig, ...]] = {
    ("stats", "half", 90): (_T(64, 128, 64, 4, 4), _T(128, 128, 32, 8, 4), _T(128, 64, 64, 8, 3)),
    ("stats", "half", 80): (_T(64, 128, 64, 4, 3), _T(128, 128, 32, 8, 4), _T(64, 64, 64, 4, 4)),
    ("stats", "fp32", 90): (_T(64, 128, 16, 8, 4), _T(128, 64, 16, 8, 4), _T(32, 64, 16, 4, 4)),
    ("stats", "fp32", 80): (_T(64, 128, 16, 8, 4), _T(128, 64, 16, 8, 4), _T(32, 64, 16, 4, 4)),
    ("jsd_rest", "half", 90): (_T(64, 128, 64, 8, 4), _T(128, 64, 64, 8, 3), _T(64, 64, 64, 4, 4)),
    ("jsd_rest", "half", 80): (_T(64, 64, 64, 4, 4), _T(128, 64, 64, 8, 3)),
    ("jsd_rest", "fp32", 90): (_T(128, 64, 32, 8, 3), _T(32, 64, 32, 4, 3), _T(64, 64, 16, 4, 4)),
    ("jsd_rest", "fp32", 80): (_T(128, 64, 32, 8, 3), _T(32, 64, 16, 4, 3), _T(64, 64, 16, 4, 4)),
    ("dense_grad", "half", 90): (_T(64, 128, 64, 8, 4), _T(128, 64, 64, 8, 3), _T(64, 64, 64, 4, 4)),
    ("dense_grad", "half", 80): (_T(64, 128, 64, 4, 3), _T(128, 128, 32, 8, 4), _T(128, 64, 64, 8, 3)),
    ("dense_grad", "fp32", 90): (_T(64, 64, 32, 4, 3), _T(128, 64, 32, 8, 3), _T(32, 128, 32, 4, 3)),
    ("dense_grad", "fp32", 80): (_T(64, 64, 32, 4, 3), _T(128, 64, 32, 8, 3), _T(32, 128, 32, 4, 3)),
}
# Rows that are not 16-element aligned (hidden % 16 != 0, e.g. the odd test shape H = 36): Triton cannot prove
# 16-byte alignment, so no load becomes an asynchronous copy and there is nothing to pipeline; every element is
# loaded through registers. One small candidate, one stage (the model-shape tiles spilled up to 1,304 bytes here).
# 64 rows: sm_90's wgmma needs 64 per warp group.
UNALIGNED_CONFIGS = {"half": _T(64, 64, 16, 4, 1), "fp32": _T(32, 64, 16, 4, 1)}
INTERPRETER_CONFIGS = {"stats": _T(16, 128, 32), "jsd_rest": _T(16, 128, 32), "dense_grad": _T(16, 128, 32)}


def aligned(hidden: int) -> bool:
    """Whether rows of `hidden` elements are 16-element aligned, so that Triton's JIT marks the row stride
    divisible by 16 and the loads can be pipelined (it specialises integer arguments on divisibility by 16)."""
    return hidden % 16 == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _topk_configs(k_pad: int, dtype_class: str, props: DeviceProps, hidden: int) -> tuple[TileConfig, ...]:
    """Top-k: the MMA tile is BLOCK_N x BLOCK_V (BLOCK_V >= K_PAD, 64 rows for wgmma); the selection runs on
    SUB_N-row slices of it staged through a scratch buffer, so the int64 keys ([SUB_N, BLOCK_V] and the running
    [SUB_N, K_PAD]) never fill a whole MMA tile's registers. SUB_N shrinks as K_PAD grows."""
    block_v = max(128, k_pad)
    sub_n = 32 if k_pad <= 64 else 16
    if not aligned(hidden):  # no asynchronous copies possible: one stage, narrow hidden slices (64 rows for
        # wgmma with half inputs; 32 for fp32, whose 64-row tile spilled 16 bytes on sm_80)
        return (_T(64 if dtype_class == "half" else 32, block_v, 16, 8, 1, 8 if k_pad == 256 else sub_n),)
    if dtype_class == "half":
        if props.arch < 90:  # sm_80: left to itself ptxas caps these at 128 registers and spills; one 8-warp
            # block per SM at up to 255 registers does not (static check), and is what the kernel gets anyway
            return (_T(64, block_v, 64, 8, 3, 8 if k_pad == 256 else sub_n, maxnreg=255),)
        return (_T(64, block_v, 64, 8, 3, sub_n), _T(64, block_v, 32, 8, 4, sub_n))
    if k_pad == 256:
        return (_T(32, 256, 16, 8, 4, 8),) if props.arch >= 90 else (_T(32, 256, 16, 8, 4, 4),)
    return (_T(64, block_v, 16, 8, 4, sub_n),)


def plan_launch(kernel: str, n_rows: int, hidden: int, vocab: int, dtype: torch.dtype, props: DeviceProps,
                k: int = 0, launch: TileConfig | None = None, splits: int | None = None) -> Launch:
    """The launch of `kernel` for `n_rows` x `hidden` inputs of `dtype` against a `vocab` x `hidden` head on a
    device with `props`; `k` for topk. `launch` / `splits` override the candidates / the split (tests)."""
    if kernel not in KERNELS:
        raise GrpoKdError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
    h_cap = max(16, _next_pow2(hidden))  # no BLOCK_H beyond the hidden size (odd small shapes)
    if launch is not None:
        configs = (launch,)
    elif kernel == "topk":
        configs = _topk_interpreter(n_rows, k) if props.interpreter else _topk_configs(
            _next_pow2(k), "fp32" if dtype == torch.float32 else "half", props, hidden)
    elif props.interpreter:
        configs = (INTERPRETER_CONFIGS[kernel],)
    elif not aligned(hidden):
        configs = (UNALIGNED_CONFIGS["fp32" if dtype == torch.float32 else "half"],)
    else:
        family = 80 if props.arch < 90 else 90
        configs = GPU_CONFIGS[(kernel, "fp32" if dtype == torch.float32 else "half", family)]
    configs = tuple(dict.fromkeys(replace(c, block_h=min(c.block_h, h_cap)) for c in configs))
    v_align = max(c.block_v for c in configs)
    if kernel == "dense_grad":  # one tile per program: the grid covers the chunk's rows x V
        return Launch(configs, triton.cdiv(vocab, v_align), v_align)
    row_block = min(c.block_n for c in configs)
    if splits is not None:
        n_tiles = triton.cdiv(vocab, v_align)
        v_per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles))) * v_align
        return Launch(configs, triton.cdiv(vocab, v_per_split), v_per_split)
    if props.interpreter:
        wanted = 1 if kernel == "topk" else 2  # exercise the split-combine path cheaply
    else:
        wanted = 4 * props.sm_count
    n_splits, v_per_split = vocab_split(n_rows, vocab, row_block, v_align, wanted)
    return Launch(configs, n_splits, v_per_split)


def _topk_interpreter(n_rows: int, k: int) -> tuple[TileConfig, ...]:
    """The interpreter's cost is per operation, not per element: few, large tiles."""
    k_pad = _next_pow2(k)
    block_n = max(16, min(64, _next_pow2(n_rows)))
    return (TileConfig(block_n, max(256, k_pad), 64, sub_n=block_n),)


# ----------------------------------------------------------------------------------------------- running


_TUNERS: dict = {}


def run(fn, launch: Launch, grid, args: dict, constexprs: dict, interpreter: bool) -> None:
    """Launch `fn` with `args` (by name) and `constexprs`; `grid(config) -> tuple`. One candidate (or the
    interpreter): a plain launch. Several: `triton.autotune` over them, keyed on the sizes and the flags."""
    if len(launch.configs) == 1 or interpreter:
        cfg = launch.configs[0]
        options = cfg.options() if not interpreter else {}
        fn[grid(cfg)](**args, **constexprs, **cfg.meta(), **options)
        return
    key = (fn, launch.configs)
    tuner = _TUNERS.get(key)
    if tuner is None:
        configs = [triton.Config(c.meta(), **c.options()) for c in launch.configs]
        tuner = triton.autotune(configs=configs, key=["H", "V", *sorted(constexprs)])(fn)
        _TUNERS[key] = tuner
    by_meta = {tuple(sorted(c.meta().items())): c for c in launch.configs}
    tuner[lambda meta: grid(by_meta[tuple(sorted((k, meta[k]) for k in launch.configs[0].meta()))])](
        **args, **constexprs)


@dataclass
class KernelCall:
    """Everything one kernel launch needs: built by a kernel module's `*_call` from (possibly meta) tensors, then
    run by `run_call` on a device or compiled by the static check for a target."""

    fn: object  # the @triton.jit kernel
    args: dict  # runtime arguments by name: tensors (real or meta), ints, floats
    constexprs: dict  # compile-time flags, without the tile sizes (those come from each TileConfig)
    launch: Launch
    grid: object  # TileConfig -> grid tuple


def run_call(call: KernelCall, props: DeviceProps) -> None:
    run(call.fn, call.launch, call.grid, call.args, call.constexprs, props.interpreter)
