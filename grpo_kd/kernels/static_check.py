"""Static GPU check: compile every Triton kernel of grpo_kd.kernels for NVIDIA targets on a machine without a GPU,
at the launches the dispatcher would pick, and read what the compiler produced.

    job (kernel, variant, arch, dtype, shape) -> launch.plan_launch with that GPU's properties (launch.PRESETS)
      -> the kernel module's `*_call` on meta tensors -> for every candidate TileConfig:
         triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))
      -> cuobjdump -res-usage (registers, stack = spill bytes) + metadata.shared + the PTX's MMA instruction

Key design choice: the signature, the constants and the divisibility attributes are derived from the launch
arguments by Triton's own specialisation (`native_specialize_impl`, as `JITFunction.run` does; meta tensors count
as 16-byte aligned, as real allocations are), so the binary compiled here is the one a GPU would build for that
launch. Launches that compile to the same binary (sizes are runtime arguments; only their divisibility by 16 and
the tile constants matter) are compiled once and listed with every shape that maps onto them.

What it cannot say: time. Registers, spills, shared memory and the MMA instruction bound what a kernel can do;
memory bandwidth, L2 reuse and the autotuner's pick are only measured on a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grpo_kd.kernels.launch import DTYPES, PRESETS, TileConfig

VARIANTS = ("plain", "full")  # "full": soft cap, bias, targets / entropy + sum z / every gradient term
RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class Job:
    """One launch to compile: a kernel, a flag variant, a target, a dtype, a shape and a candidate index."""

    kernel: str  # stats | jsd_rest | dense_grad | topk | an anchor name
    variant: str  # plain | full (anchors: their tuned configuration)
    arch: int  # 80 | 90 | 100
    dtype: str  # bf16 | fp16 | fp32
    rows: int
    hidden: int
    vocab: int
    k: int = 0  # topk only
    config: int = 0  # index into the launch's candidates
    tile: tuple = ()  # TileConfig fields to compile instead of the candidate (what-if runs and tests)


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def build_call(job: Job):
    """The KernelCall the dispatcher would make for `job` on a GPU with `PRESETS[job.arch]`, on meta tensors."""
    from grpo_kd.kernels._common import LinearOptions

    props = PRESETS[job.arch]
    dt = DTYPES[job.dtype]
    full = job.variant == "full"
    hidden, weight = _meta(job.rows, job.hidden, dtype=dt), _meta(job.vocab, job.hidden, dtype=dt)
    bias = _meta(job.vocab, dtype=dt) if full else None
    opts = LinearOptions(temperature=0.7 if full else 1.0, softcap=30.0 if full else None, impl="triton")
    row = _meta(job.rows)
    if job.kernel == "stats":
        from grpo_kd.kernels.stats import stats_call

        return stats_call(hidden, weight, bias, opts, full, full, props)[0]
    if job.kernel == "jsd_rest":
        from grpo_kd.kernels.stats import jsd_rest_call

        return jsd_rest_call(hidden, weight, bias, opts, row, row, 0.5, props)[0]
    if job.kernel == "dense_grad":
        from grpo_kd.kernels.dense_grad import dense_grad_call

        extra = (row, row, row, row) if full else (None, None, None, None)
        return dense_grad_call(hidden, weight, bias, opts, row, row, *extra, 0.5, props)[0]
    if job.kernel == "topk":
        from grpo_kd.kernels.topk import topk_call

        targets = _meta(job.rows, dtype=torch.int64) if full else None
        return topk_call(hidden, weight, job.k, bias, targets, opts.temperature, opts.softcap, props)[0]
    from grpo_kd.kernels.static_anchors import anchor_call

    return anchor_call(job)


def specialise(fn, args: dict, constexprs: dict, backend_cls) -> tuple[dict, dict, dict]:
    """(signature, constants, attrs) of `fn` for these arguments, as Triton's JIT launcher derives them."""
    from triton.runtime.jit import native_specialize_impl

    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        ty, spec = native_specialize_impl(backend_cls, args[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constants[name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend_cls.parse_attr(spec)
    return signature, constants, attrs


def root_error(exc: BaseException) -> str:
    """The innermost cause of a (nested) Triton compilation error, on one line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _mma(ptx: str) -> str:
    for needle, name in (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync")):
        if needle in ptx:
            return name
    return "none"


def occupancy(regs: int, smem: int, warps: int, arch: int) -> int:
    """Resident warps per SM from registers (allocated per warp in units of 256), shared memory (plus 1 KiB
    reserved per block) and the 64-warp / 32-block limits."""
    props = PRESETS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = props.regs_per_sm // (per_warp * warps)
    by_smem = props.smem_per_sm // (smem + 1024) if smem else 32
    by_warps = props.max_warps_per_sm // warps
    return min(by_regs, by_smem, by_warps, 32) * warps


def compile_job(job: Job, save_dir: str | None = None) -> dict:
    """Compile one candidate of one launch; returns the table row (a compile error becomes the row's error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    row = asdict(job)
    try:
        call = build_call(job)
        cfg: TileConfig = TileConfig(*job.tile) if job.tile else call.launch.configs[job.config]  # or an anchor's
        target = GPUTarget("cuda", job.arch, 32)
        sig, consts, attrs = specialise(call.fn, call.args, {**call.constexprs, **cfg.meta()},
                                        type(make_backend(target)))
        start = time.perf_counter()
        options = cfg.options() if hasattr(cfg, "options") else dict(num_warps=cfg.num_warps,
                                                                      num_stages=cfg.num_stages)
        kernel = triton.compile(ASTSource(call.fn, sig, consts, attrs), target=target, options=options)
        row["compile_s"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # a compile error is a finding, reported in the row
        row["error"] = root_error(exc)
        return row
    name = f"{job.kernel}-{job.variant}-sm{job.arch}-{job.dtype}-h{job.hidden}-k{job.k}-{cfg.label().replace(' ', '_')}"
    folder = save_dir or tempfile.mkdtemp(prefix="grpo-kd-cubin-")
    os.makedirs(folder, exist_ok=True)
    cubin = os.path.join(folder, name + ".cubin")
    with open(cubin, "wb") as handle:
        handle.write(kernel.asm["cubin"])
    out = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=False).stdout
    if save_dir is None:
        os.remove(cubin)
        os.rmdir(folder)
    found = RES_RE.search(out)
    if not found:
        row["error"] = f"cuobjdump gave no resource line: {out.strip()[:200]}"
        return row
    regs, stack, static_smem, local = map(int, found.groups())
    smem = int(kernel.metadata.shared) + static_smem
    size = torch.empty(0, dtype=DTYPES[job.dtype]).element_size()
    stage = call.stage_bytes(cfg) if hasattr(call, "stage_bytes") else (cfg.block_n + cfg.block_v) * cfg.block_h * size
    row.update(config_label=cfg.label(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, regs=regs,
               stack=stack, local=local, smem=smem, smem_limit=PRESETS[job.arch].smem_per_block,
               buffers=smem // stage if stage else 0, matmul=bool(stage), mma=_mma(kernel.asm["ptx"]),
               occupancy_warps=occupancy(regs, smem, cfg.num_warps, job.arch))
    row["problems"] = problems(row, job)
    return row


def problems(row: dict, job: Job) -> list[str]:
    """What fails the check: spills, shared memory over the per-block limit, half matmuls off the tensor cores,
    and (aligned shapes of our kernels) a missing software pipeline: Triton keeps num_stages - 1 tiles in flight,
    so it needs that many shared-memory buffers, one more when an asynchronous wgmma still reads the current one."""
    out = []
    if row["stack"] or row["local"]:
        out.append(f"spills ({row['stack']} stack bytes)")
    if row["smem"] > row["smem_limit"]:
        out.append(f"shared memory {row['smem']} > {row['smem_limit']}")
    want = {80: ("mma.sync",), 90: ("wgmma",), 100: ("tcgen05", "wgmma")}[job.arch]
    if job.dtype != "fp32" and row["matmul"] and row["mma"] not in want:
        out.append(f"{job.dtype} matmul without {'/'.join(want)} (got {row['mma']})")
    anchor = job.kernel not in ("stats", "jsd_rest", "dense_grad", "topk")
    need = row["num_stages"] - (0 if row["mma"] == "wgmma" else 1)
    if not anchor and job.hidden % 16 == 0 and (row["num_stages"] < 3 or row["buffers"] < need):
        out.append(f"not pipelined ({row['buffers']} buffers for {row['num_stages']} stages)")
    return out


def run_jobs(jobs: list[Job], workers: int = 1, save_dir: str | None = None, progress=None) -> list[dict]:
    """Compile every job in `workers` fresh (spawned) processes; rows come back in job order.

    Fresh processes because under TRITON_INTERPRET=1 (the test suite) `@triton.jit` yields interpreter objects
    that cannot be compiled: the workers start with TRITON_INTERPRET=0. Triton's on-disk cache points at a fresh
    directory for the run (removed afterwards), so that every compile time is a real compile."""
    import multiprocessing
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    saved = {name: os.environ.get(name) for name in ("TRITON_CACHE_DIR", "TRITON_INTERPRET")}
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="grpo-kd-static-cache-")
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, stated (silences its warning)
    rows = []
    try:
        with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            for row in pool.map(compile_job, jobs, [save_dir] * len(jobs)):
                rows.append(row)
                if progress:
                    progress(row)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


# ----------------------------------------------------------------------------------------------- the matrix

KERNELS = ("stats", "jsd_rest", "dense_grad", "topk")
HIDDEN = (2048, 4096, 8192)  # the models the project is for: 1B-70B students and teachers
VOCAB = (32000, 128256, 262208)  # Llama 2, Llama 3, Gemma 3
TOPK = (1, 20, 64, 100, 256)  # every K_PAD the dispatcher uses (1, 32, 64, 128, 256), powers of two or not
ROWS = 8192  # rows per launch (sizes are runtime arguments: only their divisibility by 16 changes the binary)
SMALL = dict(rows=37, hidden=(36, 48), vocab=1031, k=5)  # odd small shapes (bf16, fp32; the "full" flags);
# H=36 rows are not 16-byte aligned: no pipelining there, and none is asked for
ANCHOR_SHAPE = dict(rows=8192, hidden=4096, vocab=128256)


def default_archs() -> tuple[int, ...]:
    """sm_80 and sm_90 (A100, H100). sm_100 (`--arch 100`) needs the installed Triton's Blackwell ptxas."""
    return (80, 90)


def blackwell_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell").exists()


def _key(job: Job, call, cfg) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = type(make_backend(GPUTarget("cuda", job.arch, 32)))
    sig, consts, attrs = specialise(call.fn, call.args, {**call.constexprs, **cfg.meta()}, backend)
    return repr((job.kernel, job.variant, job.arch, job.dtype, sorted(sig.items()), sorted(map(repr, consts.items())),
                 sorted(attrs.items()), cfg.label()))


def expand(kernels=KERNELS, archs=None, dtypes=tuple(DTYPES), hidden=HIDDEN, vocab=VOCAB, ks=TOPK,
           small: bool = True, anchors: bool = True) -> list[tuple[Job, list[str]]]:
    """Every (kernel, variant, arch, dtype, shape) launch and candidate, deduplicated to distinct binaries:
    [(job to compile, shapes that launch exactly this binary)]."""
    archs = archs or default_archs()
    if 100 in archs and not blackwell_available():
        from grpo_kd.errors import GrpoKdError

        raise GrpoKdError("sm_100 needs a Triton whose wheel ships ptxas-blackwell; use --arch 80 --arch 90")
    shapes = [(ROWS, h, v) for h in hidden for v in vocab]
    if small:
        shapes += [(SMALL["rows"], h, SMALL["vocab"]) for h in SMALL["hidden"]]
    seen: dict[str, tuple[Job, list[str]]] = {}
    for kernel in kernels:
        for arch in archs:
            for dtype in dtypes:
                for rows, h, v in shapes:
                    odd = rows == SMALL["rows"]
                    if odd and dtype == "fp16":  # bf16 and fp16 compile alike; the odd shapes take bf16 and fp32
                        continue
                    for k in ((SMALL["k"],) if odd else ks) if kernel == "topk" else (0,):
                        for variant in ("full",) if odd else VARIANTS:
                            job = Job(kernel, variant, arch, dtype, rows, h, v, k)
                            call = build_call(job)
                            for i, cfg in enumerate(call.launch.configs):
                                entry = seen.setdefault(_key(job, call, cfg), (Job(**{**asdict(job), "config": i}), []))
                                entry[1].append(f"N={rows} H={h} V={v}" + (f" k={k}" if k else ""))
    out = list(seen.values())
    if anchors:
        for name in ("cce_lse_forward", "cce_backward", "liger_ce", "liger_logp"):
            for arch in archs:
                shape = ANCHOR_SHAPE
                out.append((Job(name, "tuned", arch, "bf16", shape["rows"], shape["hidden"], shape["vocab"]),
                            [f"N={shape['rows']} H={shape['hidden']} V={shape['vocab']}"]))
    return out


def anchor_installed(kernel: str) -> bool:
    import importlib.util

    package = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}.get(kernel.split("_")[0])
    return package is None or importlib.util.find_spec(package) is not None


def run_static(entries, workers: int = 1, save_dir: str | None = None, progress=None) -> list[dict]:
    """Compile the expanded matrix; anchors that are not installed become 'skipped' rows."""
    todo = [(job, shapes) for job, shapes in entries if anchor_installed(job.kernel)]
    rows = run_jobs([job for job, _ in todo], workers, save_dir, progress)
    for row, (_, shapes) in zip(rows, todo):
        row["shapes"] = shapes
    for job, shapes in entries:
        if not anchor_installed(job.kernel):
            rows.append({**asdict(job), "shapes": shapes, "skipped": "not installed (pip install -e '.[bench]')"})
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """Rows of our kernels that fail the check (compile errors included); anchors are reported, never judged."""
    return [r for r in rows if r["kernel"] in KERNELS and (r.get("error") or r.get("problems"))]


HEADER = ["kernel", "variant", "arch", "dtype", "k", "config", "regs", "spill B", "smem KiB", "buffers", "MMA",
          "warps/SM", "compile s", "launches", "verdict"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        head = [r["kernel"], r["variant"], f"sm_{r['arch']}", r["dtype"], str(r["k"] or "")]
        if r.get("skipped") or r.get("error"):
            out.append(head + [""] * 9 + [str(len(r.get("shapes", []))), r.get("skipped") or "ERROR " + r["error"]])
            continue
        verdict = "; ".join(r["problems"]) or "ok"
        if r["kernel"] not in KERNELS:
            verdict = "(anchor) " + verdict
        out.append(head + [r["config_label"], str(r["regs"]), str(r["stack"]), f"{r['smem'] / 1024:.0f}",
                           str(r["buffers"]), r["mma"], str(r["occupancy_warps"]), f"{r['compile_s']:.1f}",
                           str(len(r.get("shapes", []))), verdict])
    return out


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


def summary_markdown(rows: list[dict]) -> str:
    """One line per kernel x arch x dtype: the worst case over its variants, candidates and shapes."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("skipped") and not r.get("error"):
            groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    head = ["kernel", "arch", "dtype", "binaries", "launches", "regs (max)", "spill B (max)", "smem KiB (max)",
            "MMA", "warps/SM (min)", "compile s (max)", "failing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, arch, dtype), rs in groups.items():
        cells = [kernel, f"sm_{arch}", dtype, str(len(rs)), str(sum(len(r.get("shapes", [])) for r in rs)),
                 str(max(r["regs"] for r in rs)), str(max(r["stack"] for r in rs)),
                 f"{max(r['smem'] for r in rs) / 1024:.0f}", "/".join(sorted({r["mma"] for r in rs})),
                 str(min(r["occupancy_warps"] for r in rs)), f"{max(r['compile_s'] for r in rs):.1f}",
                 str(sum(bool(r["problems"]) for r in rs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
