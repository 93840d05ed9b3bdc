"""Data parallelism for the update phase: one process per device under `torchrun`, or a single process.

Key design choices:
- The trainable parts (the student and PPO's value head) sit behind one `TrainModule.forward`, which DDP or
  FSDP wraps, so gradient all-reduce (DDP) or reduce-scatter (FSDP) covers every trainable parameter.
- The loss is computed *inside* that forward: the algorithms hand `TrainModule.forward` a closure
  `loss_fn(hidden, values) -> (loss, metrics)` that runs the fused kernels on the completion hidden states with
  the LM-head weight. Under FSDP (`optim.data_parallel: fsdp`, FSDP2 `fully_shard`, see fsdp.py) the head
  weight is a shard outside the forward and whole inside it, and stays whole through the backward; under DDP
  it makes no difference. A plain forward (no closure) still returns (hidden, values).
- Ranks reduce only small tensors (counts, metric sums, the stop flag); data never moves between ranks: each
  rank reads its own groups from the memory-mapped cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from grpo_kd.cache.reader import completion_hidden
from grpo_kd.config import Config
from grpo_kd.device import infer_device
from grpo_kd.models import final_hidden_states

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this process called init_process_group (and so destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=infer_device(device))
    import torch.distributed as td

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = infer_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    started = False
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
        started = True
    log.info("update: rank %d of %d on %s (%s)", td.get_rank(), world, target, td.get_backend())
    return Dist(rank=td.get_rank(), world_size=world, device=target, started_here=started)


def shutdown(dist: Dist) -> None:
    if dist.started_here:
        import torch.distributed as td

        td.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum of a small float64 tensor over ranks (a copy on the CPU; gloo and nccl both)."""
    if not dist.active:
        return values
    import torch.distributed as td

    reduced = values.to(dist.device, torch.float64).clone()
    td.all_reduce(reduced)
    return reduced.cpu()


def barrier(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td

        td.barrier()


def student_config(cfg: Config, dist: Dist):
    """The model config with this rank's device."""
    return dataclasses.replace(cfg.model, device=str(dist.device))


class TrainModule(nn.Module):
    """The student and, for PPO, a float32 value head, behind one forward (what DDP wraps)."""

    def __init__(self, policy: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, input_ids, attention_mask, prompt_lengths, num_completion: int, loss_fn=None):
        """-> (hidden (B, T, H) predicting completion tokens 0..T-1, values (B, T) float32 | None), or with
        `loss_fn` what `loss_fn(hidden, values)` returns, computed here while the LM head is whole."""
        device = next(self.policy.parameters()).device
        hidden = final_hidden_states(self.policy, input_ids.to(device), attention_mask.to(device).long())  # (B, L, H)
        hidden = completion_hidden(hidden, prompt_lengths.to(device), num_completion)  # (B, T, H)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden.float()).squeeze(-1)  # (B, T)
        return (hidden, values) if loss_fn is None else loss_fn(hidden, values)


def new_value_head(policy: nn.Module) -> nn.Linear:
    hidden_size = policy.get_input_embeddings().weight.shape[1]
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(next(policy.parameters()).device)


def wrap(module: TrainModule, dist: Dist, cfg: Config) -> nn.Module:
    """DDP around the train module, or FSDP2 sharding of it in place, when running under torchrun."""
    if not dist.active:
        return module
    if cfg.optim.data_parallel == "fsdp":
        from grpo_kd.train.fsdp import shard

        return shard(module, dist)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids)
