"""Fused LM-head kernels: log-probs, top-k, sparse KL and the GRPO loss, from hidden states, never full logits.

Each function has a Triton path (CUDA, or CPU under TRITON_INTERPRET=1) and a chunked pure-PyTorch twin,
chosen by `impl=`. See docs/kernels.md for the math.
"""
