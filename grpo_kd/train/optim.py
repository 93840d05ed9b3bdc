"""The optimizer and the learning-rate schedule of the update phase.

AdamW over the trainable parameters (LoRA adapters, or the whole student, plus PPO's value head); weight decay
only on matrices (not on biases and norms). The schedule is a `LambdaLR` over the whole run — `iterations x
steps per iteration` optimizer steps — so that a linear or cosine decay spans all iterations; its state (plain
numbers) travels in each checkpoint, so iteration i continues where iteration i-1 stopped.

    lr(s) = lr * s / warmup                                     s < warmup
          = lr * {1, 1 - p, (1 + cos(pi p)) / 2}                 constant, linear, cosine,
                                                                  p = (s - warmup) / (total - warmup)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from grpo_kd.config import OptimConfig
from grpo_kd.errors import GrpoKdError


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise GrpoKdError("the student has no trainable parameter (LoRA targets missing, or everything frozen)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The multiplier of `cfg.lr` before optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
