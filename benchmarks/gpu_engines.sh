#!/usr/bin/env bash
# Rollout and teacher-pass throughput, transformers vs vLLM, at 7B and 27B on a GPU machine (about 30-60 min).
#
#   bash benchmarks/gpu_engines.sh                         # random-weight models of Llama-2-7B's and Gemma-3-27B's
#                                                          # shapes (the 27B one writes ~54 GB of weights)
#   bash benchmarks/gpu_engines.sh --prompts 64 --max-new-tokens 256   # extra flags go to bench_engines.py
#   MODEL_7B=/models/Mistral-7B MODEL_27B=/models/gemma-3-27b bash benchmarks/gpu_engines.sh   # real checkpoints
#
# Needs a CUDA GPU and the CUDA build of vLLM (pip install -e '.[vllm]'); without a GPU it stops at once.
# Results: benchmarks/results/<gpu>/engines-gpu-7b.{json,md} and engines-gpu-27b.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_engines.sh: no CUDA GPU here; this benchmark measures both engines on GPUs only" >&2
  exit 1
fi
python -c "import vllm" || { echo "gpu_engines.sh: vLLM is not installed: pip install -e '.[vllm]'" >&2; exit 1; }
python benchmarks/bench_engines.py --preset gpu-7b ${MODEL_7B:+--model-dir "$MODEL_7B"} --prompts 64 "$@"
python benchmarks/bench_engines.py --preset gpu-27b ${MODEL_27B:+--model-dir "$MODEL_27B"} --prompts 64 "$@"
