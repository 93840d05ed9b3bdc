"""Anchors for the static check: other projects' Triton kernels that do the same work, compiled the same way.

    cce_lse_forward   Cut Cross-Entropy (PyPI cut-cross-entropy): the fused LM-head log-sum-exp forward, at its
                      tuned default (CCE_AUTOTUNE unset) of 256x128x32, 8 warps, 3 stages
    cce_backward      its fused backward (dE and dC by atomics), tuned default 128x128x32, 4 warps, 4 stages
    liger_ce          Liger-Kernel's cross-entropy row kernel, as its fused linear cross entropy launches it on a
                      materialised [chunk, V] logits block (block min(32768, next_pow2(V)), 32 warps)
    liger_logp        Liger-Kernel's GRPO selective log-softmax row kernel on logits (block 2048, 1 warp, 4 stages)

Each builder fills the arguments the anchor's own launcher passes (read from its source, not copied) with meta
tensors, and resolves its `triton.heuristics` the way its launcher would; the kernels themselves are imported
from the installed packages (`pip install -e '.[bench]'`). An anchor that is not installed is reported as
skipped. Key design choice: anchors go through the same `compile_job` path as our kernels, so the two columns of
the report are comparable figure for figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels.launch import DTYPES, Launch

ANCHORS = ("cce_lse_forward", "cce_backward", "liger_ce", "liger_logp")


@dataclass(frozen=True)
class AnchorConfig:
    """An anchor's launch: its block constexprs, warps and stages (duck-types TileConfig for compile_job)."""

    meta_values: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    stage: int = 0  # bytes of one pipelined operand stage (0: not a matmul)

    def meta(self) -> dict:
        return dict(self.meta_values)

    def label(self) -> str:
        blocks = "x".join(str(v) for _, v in self.meta_values)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


@dataclass
class AnchorCall:
    fn: object
    args: dict
    constexprs: dict
    launch: Launch

    def stage_bytes(self, cfg: AnchorConfig) -> int:
        return cfg.stage


def _jit(kernel):
    """The JITFunction under an anchor's triton.heuristics / autotune wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def anchor_call(job) -> AnchorCall:
    """The anchor kernel `job.kernel` at its tuned launch for `job`'s shape and dtype, on meta tensors."""
    dt = DTYPES[job.dtype]
    B, D, V = job.rows, job.hidden, job.vocab
    size = torch.empty(0, dtype=dt).element_size()
    if job.kernel == "cce_lse_forward":
        from cut_cross_entropy.cce_lse_forward import _cce_lse_forward_kernel
        from cut_cross_entropy.tl_utils import b_bin_fn

        cfg = AnchorConfig((("BLOCK_B", 256), ("BLOCK_V", 128), ("BLOCK_D", 32)), 8, 3, (256 + 128) * 32 * size)
        args = dict(E=_meta(B, D, dtype=dt), C=_meta(V, D, dtype=dt), LSE=_meta(B), LA=None,
                    Locks=_meta(B // 128 + 1, dtype=torch.int32), Valids=None, softcap=None, B=B, V=V, D=D,
                    stride_eb=D, stride_ed=1, stride_cv=D, stride_cd=1, stride_lse_b=1, stride_vb=1, num_locks=B,
                    B_BIN=b_bin_fn(B))
        flags = dict(EVEN_D=D % 32 == 0, HAS_VALIDS=False, HAS_SOFTCAP=False, HAS_LA=False, GROUP_B=8,
                     DOT_PRECISION="ieee")
        return AnchorCall(_jit(_cce_lse_forward_kernel), args, flags, Launch((cfg,), 1, 0))
    if job.kernel == "cce_backward":
        from cut_cross_entropy.cce_backward import _cce_backward_kernel
        from cut_cross_entropy.tl_utils import b_bin_fn

        cfg = AnchorConfig((("BLOCK_B", 128), ("BLOCK_V", 128), ("BLOCK_D", 32)), 4, 4, (128 + 128) * 32 * size)
        locks = D // 64 + 1
        args = dict(E=_meta(B, D, dtype=dt), C=_meta(V, D, dtype=dt), LSE=_meta(B), dOut=_meta(1), grad_scale=1.0,
                    Valids=None, VocabOrdering=None, softcap=None, Targets=_meta(B, dtype=torch.int64),
                    dE=_meta(B, D, dtype=dt), dELocks=_meta(B, locks, dtype=torch.int32), dC=_meta(V, D, dtype=dt),
                    dCLocks=_meta(V, locks, dtype=torch.int32), B=B, D=D, V=V, n_de_locks_0=B, n_de_locks_1=locks,
                    n_dc_locks_0=V, n_dc_locks_1=locks, stride_eb=D, stride_ed=1, stride_cv=D, stride_cd=1,
                    stride_vb=1, filter_eps=2.0**-12, B_BIN=b_bin_fn(B))
        flags = dict(MM_BACK_BLOCK_D=64, EVEN_D=D % 32 == 0, MM_BACK_EVEN_D=D % 64 == 0, HAS_VALIDS=False,
                     HAS_VOCAB_ORDERING=False, FILTER_GRAD=True, HAS_TARGETS=True, HAS_SOFTCAP=False, ITEM_DO=True,
                     GROUP_B=8, SHIFT=False, REQUIRES_GRAD=True)
        return AnchorCall(_jit(_cce_backward_kernel), args, flags, Launch((cfg,), 1, 0))
    if job.kernel == "liger_ce":
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

        block = min(32768, 1 << (V - 1).bit_length())
        cfg = AnchorConfig((("BLOCK_SIZE", block),), 32, 3)
        n = _meta(B)
        args = dict(X_ptr=_meta(B, V, dtype=dt), X_stride=V, Y_ptr=_meta(B, dtype=torch.int64), Y_stride=1,
                    weight_ptr=None, loss_ptr=n, z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None,
                    token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=V,
                    n_non_ignore=B, sum_non_ignore_weight=B, weight_sum=0.0, ignore_index=-100,
                    softcap=None)
        flags = dict(lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", RETURN_Z_LOSS=False,
                     RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False,
                     HAS_SOFTCAPPING=False, HAS_GRADIENTS=True)
        return AnchorCall(_jit(liger_cross_entropy_kernel), args, flags, Launch((cfg,), 1, 0))
    if job.kernel == "liger_logp":
        from liger_kernel.ops.grpo_loss import _selective_log_softmax_kernel

        cfg = AnchorConfig((("BLOCK_N", 2048),), 1, 4)
        L = 512
        args = dict(LOGITS=_meta(B // L, L + 1, V, dtype=dt), INPUT_IDS=_meta(B // L, L, dtype=torch.int64),
                    LOG_P=_meta(B // L, L), MASK=_meta(B // L, L, dtype=torch.int64), stride_input_ids_b=L,
                    stride_input_ids_l=1, stride_mask_b=L, stride_mask_l=1)
        flags = dict(TEMPERATURE=1.0, L=L, N=V)
        return AnchorCall(_jit(_selective_log_softmax_kernel), args, flags, Launch((cfg,), 1, 0))
    raise GrpoKdError(f"unknown kernel {job.kernel!r}")
