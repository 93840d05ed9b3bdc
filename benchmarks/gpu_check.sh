#!/usr/bin/env bash
# What a person with an NVIDIA GPU runs as is, from the repository root; sized to finish in under 8 minutes
# (not yet run on a GPU: no GPU was available to the session that wrote it):
#   1. the kernel tests on CUDA (tests/kernels/test_cuda.py: the compiled, autotuned Triton kernels against the
#      torch twin on the same CUDA tensors), with TRITON_INTERPRET=0;
#   2. the kernel benchmark against eager PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy at the
#      anchor shapes of docs/kernels.md (N=8192, H=4096, V=128256 bf16; top-k at V=262144), which writes
#      benchmarks/results/cuda-<gpu name>/kernels.{json,md} with the command that made them.
# Needs: pip install -e '.[dev,bench]' with the PyTorch build for your CUDA. Without a CUDA device it says so in
# one line and exits 2. Options: --quick (small shapes, about a minute), --skip-tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
QUICK=()
TESTS=1
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    --skip-tests) TESTS=0 ;;
    *) echo "gpu_check.sh: unknown option $arg (use --quick, --skip-tests)" >&2; exit 2 ;;
  esac
done

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device visible to PyTorch here; run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
for pkg in liger_kernel cut_cross_entropy; do
  "$PYTHON" -c "import $pkg" 2>/dev/null || echo "gpu_check.sh: $pkg is not installed; its rows will say skipped (pip install -e '.[bench]')" >&2
done

start=$(date +%s)
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, torch {torch.__version__}')"
if [ "$TESTS" = 1 ]; then
  TRITON_INTERPRET=0 "$PYTHON" -m pytest tests/kernels/test_cuda.py -q -m gpu -p no:cacheprovider
fi
"$PYTHON" benchmarks/bench_kernels.py --device cuda "${QUICK[@]}"
echo "gpu_check.sh: done in $(( $(date +%s) - start )) s; results under benchmarks/results/cuda-*/"
