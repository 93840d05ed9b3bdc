"""Kernel benchmarks: grpo-kd's fused kernels against eager PyTorch (and torch.compile, Liger-Kernel and the
plain-matmul floor on a GPU), each measurement in its own subprocess. Writes
benchmarks/results/<device>/kernels.{json,md} (kernels-quick.* with --quick), each recording this command.

    python benchmarks/bench_kernels.py              # full sizes on the GPU if there is one, else the CPU
    python benchmarks/bench_kernels.py --quick      # small shapes while developing
    python benchmarks/bench_kernels.py --device cpu

The logic lives in grpo_kd/kernels/bench.py (also behind `grpo-kd bench kernels`).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo_kd.kernels import bench  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(ROOT / "benchmarks" / "results")]
    return bench.main(args, command=" ".join(["python benchmarks/bench_kernels.py", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
