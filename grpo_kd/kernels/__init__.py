"""Fused LM-head kernels: log-probs, top-k, sparse KL and the GRPO loss, from hidden states, never full logits.

Each function has a Triton path (CUDA, or CPU under TRITON_INTERPRET=1) and a chunked pure-PyTorch twin,
chosen by `impl=`. See docs/kernels.md for the math.
"""

from grpo_kd.kernels.grpo_loss import linear_grpo_loss
from grpo_kd.kernels.logprobs import linear_logprobs
from grpo_kd.kernels.sparse_kl import linear_sparse_kl
from grpo_kd.kernels.topk import linear_topk

__all__ = ["linear_grpo_loss", "linear_logprobs", "linear_sparse_kl", "linear_topk"]
