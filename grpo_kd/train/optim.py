"""The optimizer and the learning-rate schedule of the update phase.

AdamW over the trainable parameters (LoRA adapters, or the whole student, plus PPO's value head); weight decay
only on matrices (not on biases and norms). Mixed precision: when trainable parameters are bfloat16 or float16
(a full fine-tune of a student loaded in 16 bits, the forward and backward in 16 bits), the step is taken in
float32 (`MasterWeightAdamW`): a float32 master copy of each such parameter and float32 moments live in the
optimizer state (and so in every checkpoint), and the parameter is the master rounded to 16 bits after each step.
Plain AdamW on bfloat16 parameters loses every update smaller than half a bfloat16 step of the weight (about
0.4% of it): at a learning rate of 1e-5 most updates round away. Cost: 12 bytes of optimizer state per 16-bit
parameter instead of 4. All-float32 parameters (LoRA adapters, which peft keeps in float32, or a float32
student) use torch's AdamW as before. The schedule is a `LambdaLR` over the whole run — `iterations x
steps per iteration` optimizer steps — so that a linear or cosine decay spans all iterations; its state (plain
numbers) travels in each checkpoint, so iteration i continues where iteration i-1 stopped.

    lr(s) = lr * s / warmup                                     s < warmup
          = lr * {1, 1 - p, (1 + cos(pi p)) / 2}                 constant, linear, cosine,
                                                                  p = (s - warmup) / (total - warmup)
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

from grpo_kd.config import OptimConfig
from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; `MasterWeightAdamW` when any of them is 16-bit."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise GrpoKdError("the student has no trainable parameter (LoRA targets missing, or everything frozen)")
    if len(cfg.betas) != 2:
        raise GrpoKdError(f"optim.betas must hold two numbers, got {cfg.betas}")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    low = sorted({str(p.dtype).removeprefix("torch.") for g in groups for p in g["params"] if p.dtype in _LOW})
    if low:
        log.info("%s trainable parameters: AdamW with float32 master weights and moments", "/".join(low))
        return MasterWeightAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


_LOW = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, torch's formula) computed in float32.

    Per parameter the state holds `exp_avg`, `exp_avg_sq` (float32), `step`, and for a 16-bit parameter `master`,
    its float32 value; the step updates the master and writes it back rounded to the parameter's dtype. A float32
    parameter is its own master.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if param.dtype != torch.float32:
                        state["master"] = param.detach().float()
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                master = state.get("master", param)
                grad = param.grad.float()
                state["step"] += 1
                step = float(state["step"])
                master.mul_(1 - lr * decay)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                master.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
                if master is not param:
                    param.copy_(master)  # round to the parameter's dtype
        return loss

    def load_state_dict(self, state_dict) -> None:
        """As torch's, except that the master weights and moments stay float32 (torch casts floating-point state to
        the parameter's dtype, which would round the masters to 16 bits on every resume)."""
        kept = {int(index): {name: value for name, value in entries.items() if torch.is_tensor(value) and name != "step"}
                for index, entries in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in kept.items():
            for name, value in entries.items():
                self.state[params[index]][name] = value.to(device=params[index].device, dtype=torch.float32)


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
