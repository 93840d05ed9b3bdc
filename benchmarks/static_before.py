"""The 'before' column of docs/kernels.md's static table: the Triton kernels of an earlier commit (default
df9a665, main before issue 14) compiled with the static check's JIT-faithful path (grpo_kd.kernels.static_check)
at that commit's GPU launches (bf16, N=8192, H=4096, V=128256, soft cap, bias, targets, every flag on):
stats/jsd_rest/dense_grad at block_sizes() = 64x128x64 with Triton's default 4 warps and 3 stages, top-k at
default_launch() = BLOCK_M 64 (k <= 64) or 32, BLOCK_V max(128, K_PAD), 8 warps, 3 stages.

    python benchmarks/static_before.py [--commit df9a665] [--k 20 --k 64 ...] [--out FILE]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(commit: str, folder: Path):
    """Write the commit's stats.py, dense_grad.py and topk.py as before_*.py modules and import them."""
    for name in ("stats", "dense_grad", "topk"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:grpo_kd/kernels/{name}.py"],
                              capture_output=True, text=True, check=True).stdout
        text = text.replace("from grpo_kd.kernels.stats import", "from before_stats import")
        (folder / f"before_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    import before_dense_grad
    import before_stats
    import before_topk

    return before_stats, before_dense_grad, before_topk


def _cases(stats, dense_grad, topk, ks):
    import torch

    m = lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    f32 = lambda *s: m(*s, dt=torch.float32)  # noqa: E731
    N, H, V = 8192, 4096, 128256
    common = dict(h_ptr=m(N, H), w_ptr=m(V, H), b_ptr=m(V), N=N, V=V, H=H, stride_hn=H, stride_wv=H, inv_temp=1.0,
                  softcap=30.0)
    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, DOT_PREC="ieee", UPCAST=False)
    yield ("stats", 0, "64x128x64 w4 s3", stats._stats_fwd_kernel,
           dict(common, m_ptr=f32(4, N), s_ptr=f32(4, N), t_ptr=f32(4, N), sz_ptr=f32(4, N), v_per_split=32768),
           dict(flags, M_INIT=-1e30, NEED_T=True, NEED_SZ=True), 4, 3)
    yield ("jsd_rest", 0, "64x128x64 w4 s3", stats._jsd_rest_fwd_kernel,
           dict(common, lse_ptr=f32(N), pr_ptr=f32(N), r_ptr=f32(4, N), rq_ptr=f32(4, N), v_per_split=32768,
                beta=0.5), flags, 4, 3)
    yield ("dense_grad", 0, "64x128x64 w4 s3", dense_grad._dense_grad_kernel,
           dict(common, lse_ptr=f32(N), a_ptr=f32(N), bc_ptr=f32(N), d_ptr=f32(N), c_ptr=f32(N), pr_ptr=f32(N),
                dx_ptr=m(N, V), stride_dn=V, beta=0.5), dict(flags, HAS_B=True, HAS_D=True, HAS_JSD=True), 4, 3)
    for k in ks:
        k_pad = 1 << (k - 1).bit_length()
        block_m, block_v = (64 if k_pad <= 64 else 32), max(128, k_pad)
        yield ("topk", k, f"{block_m}x{block_v}x64 w8 s3", topk._topk_fwd_kernel,
               dict(hidden_ptr=m(N, H), weight_ptr=m(V, H), bias_ptr=f32(V), target_ptr=m(N, dt=torch.int64),
                    keys_ptr=m(N, 4, k_pad, dt=torch.int64), split_lse_ptr=f32(N, 4), target_z_ptr=f32(N), N=N, H=H,
                    V=V, stride_hn=H, stride_wv=H, tiles_per_split=251, num_splits=4, inv_temperature=1.0,
                    softcap=30.0),
               dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_TARGET=True, K_PAD=k_pad, LOG_K=k_pad.bit_length() - 1,
                    LOG_V=block_v.bit_length() - 1, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=64,
                    INPUT_PRECISION="tf32"), 8, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="df9a665")
    parser.add_argument("--k", type=int, action="append", help="top-k sizes (default 20, 64, 128, 256)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import os

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="grpo-kd-before-cache-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from grpo_kd.kernels.static_check import RES_RE, _cuobjdump, _mma, occupancy, root_error, specialise

    rows = []
    modules = _load(args.commit, Path(tempfile.mkdtemp(prefix="grpo-kd-before-")))
    for arch in (80, 90):
        target = GPUTarget("cuda", arch, 32)
        for kernel, k, label, fn, call_args, consts, warps, stages in _cases(*modules, args.k or (20, 64, 128, 256)):
            row = dict(kernel=kernel, k=k, arch=arch, dtype="bf16", config_label=label)
            sig, c, a = specialise(fn, call_args, consts, type(make_backend(target)))
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, sig, c, a), target=target,
                                          options=dict(num_warps=warps, num_stages=stages))
            except Exception as exc:  # a compile error is a finding
                row["error"] = root_error(exc)
                rows.append(row)
                print(row, flush=True)
                continue
            row["compile_s"] = round(time.perf_counter() - start, 1)
            cubin = Path(tempfile.mktemp(suffix=".cubin"))
            cubin.write_bytes(compiled.asm["cubin"])
            res = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
            regs, stack, static_smem, _ = map(int, RES_RE.search(res).groups())
            smem = compiled.metadata.shared + static_smem
            row.update(regs=regs, stack=stack, smem=smem, mma=_mma(compiled.asm["ptx"]),
                       occupancy_warps=occupancy(regs, smem, warps, arch))
            rows.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(["python benchmarks/static_before.py", *sys.argv[1:]]),
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
