"""The static GPU check: every Triton kernel compiled for sm_80 / sm_90 here (no GPU), at the launches the
dispatcher picks, must not spill, must fit shared memory, must keep its software pipeline and must use the tensor
cores for half inputs. The full matrix is `grpo-kd bench kernels --static` (docs/kernels.md); CI compiles
representative subsets (`test_ci_subset_passes`, slow: model shapes, fp32 lse-only stats, the odd small shapes)
and checks that the check itself can fail.
"""

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grpo_kd.kernels import launch  # noqa: E402
from grpo_kd.kernels._common import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not importable")


def _cuobjdump_runs() -> bool:
    from grpo_kd.kernels.static_check import _cuobjdump

    try:
        return subprocess.run([_cuobjdump(), "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


needs_toolchain = pytest.mark.skipif(not triton_available() or not _cuobjdump_runs(),
                                     reason="the triton wheel's NVIDIA toolchain (ptxas, cuobjdump) does not run here")


def test_launchers_and_static_check_share_one_plan():
    """What the static check compiles is what stats_triton would launch: same candidates, same split."""
    from grpo_kd.kernels._common import LinearOptions
    from grpo_kd.kernels.stats import stats_call

    meta = lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    opts = LinearOptions(impl="triton")
    for props in (launch.A100, launch.H100):
        call, outs = stats_call(meta(4096, 4096), meta(128256, 4096), None, opts, True, False, props)
        plan = launch.plan_launch("stats", 4096, 4096, 128256, torch.bfloat16, props)
        assert call.launch == plan and outs[0].shape == (plan.splits, 4096)
        assert all(plan.v_per_split % c.block_v == 0 for c in plan.configs)
        assert plan.splits * plan.v_per_split >= 128256 > (plan.splits - 1) * plan.v_per_split


def test_unaligned_rows_take_the_one_stage_class():
    """H % 16 != 0: one small unpipelined candidate per kernel; aligned H keeps the pipelined lists."""
    for props in (launch.A100, launch.H100):
        for kernel in launch.KERNELS:
            for dtype in (torch.bfloat16, torch.float32):
                odd = launch.plan_launch(kernel, 37, 36, 1031, dtype, props, k=5)
                assert len(odd.configs) == 1 and odd.configs[0].num_stages == 1 and odd.configs[0].block_h == 16
                aligned = launch.plan_launch(kernel, 37, 48, 1031, dtype, props, k=5)
                assert all(c.num_stages >= 3 for c in aligned.configs)


def test_specialisation_matches_the_jit():
    """16-divisible sizes and meta pointers get Triton's divisibility attribute (which enables pipelining);
    a size of 1 becomes a constant; odd sizes get nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from grpo_kd.kernels._common import LinearOptions
    from grpo_kd.kernels.static_check import specialise
    from grpo_kd.kernels.stats import stats_call

    backend = type(make_backend(GPUTarget("cuda", 90, 32)))
    meta = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")  # noqa: E731
    call, _ = stats_call(meta(37, 4096), meta(1, 4096), None, LinearOptions(impl="triton"), True, False, launch.H100)
    cfg = call.launch.configs[0]
    sig, consts, attrs = specialise(call.fn, call.args, {**call.constexprs, **cfg.meta()}, backend)
    names = call.fn.arg_names
    assert sig["h_ptr"] == "*bf16" and sig["m_ptr"] == "*fp32" and sig["N"] == "i32" and sig["inv_temp"] == "fp32"
    assert sig["V"] == "constexpr" and consts["V"] == 1 and consts["BLOCK_N"] == cfg.block_n
    assert (names.index("H"),) in attrs and (names.index("h_ptr"),) in attrs and (names.index("N"),) not in attrs


def test_problems_flag_each_failure():
    from grpo_kd.kernels.static_check import Job, problems

    job = Job("stats", "full", 90, "bf16", 8192, 4096, 128256)
    ok = dict(stack=0, local=0, smem=99328, smem_limit=232448, mma="wgmma", matmul=True, num_stages=4, buffers=4)
    assert problems(ok, job) == []
    assert "spills" in problems({**ok, "stack": 16}, job)[0]
    assert "shared memory" in problems({**ok, "smem": 300000}, job)[0]
    assert "without wgmma" in problems({**ok, "mma": "mma.sync"}, job)[0]
    assert "not pipelined" in problems({**ok, "buffers": 1}, job)[0]
    sm80 = Job("stats", "full", 80, "bf16", 8192, 4096, 128256)
    assert problems({**ok, "mma": "mma.sync", "buffers": 3}, sm80) == []  # sm_80 keeps num_stages - 1 in flight


def test_occupancy_from_registers_and_shared_memory():
    from grpo_kd.kernels.static_check import occupancy

    assert occupancy(128, 0, 8, 90) == 16  # 128 regs x 256 threads = 32k of 64k registers: 2 blocks
    assert occupancy(255, 0, 4, 90) == 8  # 256 regs per thread: 2 blocks of 4 warps
    assert occupancy(64, 120_000, 4, 90) == 4  # one 120 KB block per 228 KB SM


@needs_toolchain
@pytest.mark.slow
def test_the_check_catches_a_spilling_launch():
    """A launch known to spill (dense_grad with every term at 128x128x64, 8 warps, on sm_90: 64 fp32 tile elements
    per thread through a long epilogue) fails the check, so the passing subsets below are not passing by
    construction."""
    from grpo_kd.kernels.static_check import Job, run_jobs

    (row,) = run_jobs([Job("dense_grad", "full", 90, "bf16", 8192, 4096, 128256, tile=(128, 128, 64, 8, 3))])
    assert not row.get("error"), row.get("error")
    assert row["stack"] > 0 and any("spills" in p for p in row["problems"])


# Representative subsets of the matrix: both architectures; the model shape (H = 4096, V = 128256) with every
# flag on in bf16, the largest top-k, fp32 with every flag and fp32 lse-only stats (the variant that spilled
# 8-16 bytes at BLOCK_H = 32); the odd small shapes (N = 37, V = 1031, H = 48 aligned and H = 36 unaligned, which
# takes the one-stage launch class), where the model tiles spilled up to 1,304 bytes. The rest:
# `grpo-kd bench kernels --static` (docs/kernels.md).
MODEL = dict(hidden=(4096,), vocab=(128256,), small=False)
ODD = dict(hidden=(), vocab=(), small=True)
CI_SUBSET = {
    "model-bf16": dict(kernels=("stats", "jsd_rest", "dense_grad"), archs=(90, 80), dtypes=("bf16",),
                       variants=("full",), **MODEL),
    "model-fp32": dict(kernels=("stats", "dense_grad"), archs=(90,), dtypes=("fp32",), variants=("full",), **MODEL),
    "model-fp32-lse-only": dict(kernels=("stats",), archs=(90, 80), dtypes=("fp32",), variants=("plain",), **MODEL),
    "model-topk": dict(kernels=("topk",), archs=(90, 80), dtypes=("bf16",), ks=(256,), variants=("full",), **MODEL),
    "odd-bf16": dict(kernels=("stats", "jsd_rest", "dense_grad", "topk"), archs=(90, 80), dtypes=("bf16",), **ODD),
    "odd-fp32": dict(kernels=("stats", "topk"), archs=(80,), dtypes=("fp32",), **ODD),
}


@needs_toolchain
@pytest.mark.slow
@pytest.mark.parametrize("subset", sorted(CI_SUBSET))
def test_ci_subset_passes(subset):
    from grpo_kd.kernels import static_check as sc

    spec = {"ks": (64,), "variants": sc.VARIANTS, **CI_SUBSET[subset]}
    entries = sc.expand(spec["kernels"], spec["archs"], spec["dtypes"], hidden=spec["hidden"], vocab=spec["vocab"],
                        ks=spec["ks"], small=spec["small"], anchors=False)
    entries = [(job, shapes) for job, shapes in entries if job.variant in spec["variants"]]
    if spec["small"]:  # the odd shapes only (expand adds them beside the model shapes asked for, here none)
        assert all(job.rows == sc.SMALL["rows"] for job, _ in entries)
        assert {job.hidden for job, _ in entries} == set(sc.SMALL["hidden"])
    rows = sc.run_static(entries, workers=2)
    assert rows and len(rows) == len(entries)
    failed = sc.failures(rows)
    assert not failed, sc.markdown(failed, "test")
    for row in rows:
        if row["dtype"] != "fp32":
            assert row["mma"] == {80: "mma.sync", 90: "wgmma"}[row["arch"]]


def test_static_cli_refuses_an_unknown_arch():
    proc = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "bench", "kernels", "--static", "--arch", "70"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "arch" in lines[0], proc.stderr
