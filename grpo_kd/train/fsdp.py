"""FSDP for students that do not fit one GPU: FSDP2 `fully_shard` of the train module, and full-state checkpoints.

    module = shard(train_module, dist)        # in place: each decoder layer, the value head, then the root
    tensors = full_state(module.policy, dist)  # collective; the whole state on rank 0's CPU, {} elsewhere

Key design choices:
- The fused losses need the whole LM-head weight. FSDP2 keeps a unit's parameters whole from its forward
  until its backward is done only for the root unit, and reads them whole only inside a forward. So the
  embeddings, final norm and LM head stay in the root unit (TrainModule), and the loss is computed inside
  `TrainModule.forward` (the algorithms pass a `loss_fn` closure, distributed.py). The alternatives were worse:
  summoning the head by hand outside the forward duplicates what FSDP already does, and a head kept
  unsharded needs its gradient all-reduced by hand; both leak into every algorithm.
- Decoder layers (the classes the model lists in `_no_split_modules`) are units of their own, so only one
  layer's parameters are whole at a time. The value head (float32) is its own unit too, because a unit needs
  one parameter dtype; for the same reason LoRA (float32 adapters) over a bfloat16 base is not supported here
  (with LoRA a 7B student fits one GPU: use ddp).
- Checkpoints stay what they are without FSDP: `save_pretrained` safetensors and the optimizer by parameter
  index. Every rank takes part in gathering each sharded tensor (`full_tensor`, one at a time, so no rank ever
  holds two copies of the model); rank 0 keeps them on its CPU and writes. Loading reshards: the model loads
  whole before `shard`, and `ShardedOptimizer.load_state_dict` cuts each full optimizer tensor to this rank's
  shard of its parameter.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)


def _dtensor():
    from torch.distributed.tensor import DTensor, distribute_tensor

    return DTensor, distribute_tensor


def decoder_layers(policy: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF (or peft-wrapped) model: instances of its `_no_split_modules` classes."""
    from grpo_kd.models import _hf_model

    names = set(getattr(_hf_model(policy), "_no_split_modules", None) or [])
    return [m for m in policy.modules() if type(m).__name__ in names]


def shard(module: nn.Module, dist) -> nn.Module:
    """`fully_shard` each decoder layer, the value head and the root (TrainModule), over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dtypes = {p.dtype for p in module.policy.parameters()}
    if len(dtypes) > 1:
        raise GrpoKdError(f"optim.data_parallel=fsdp needs one parameter dtype in the student, got "
                          f"{sorted(map(str, dtypes))} (LoRA adapters over a half-precision base?); use ddp")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for layer in decoder_layers(module.policy):
        fully_shard(layer, mesh=mesh)
    if module.value_head is not None:
        fully_shard(module.value_head, mesh=mesh)
    fully_shard(module, mesh=mesh)  # root: embeddings, final norm, LM head (whole from forward to backward end)
    log.info("fsdp: %d decoder layers + root sharded over %d ranks (%s)", len(decoder_layers(module.policy)),
             dist.world_size, dist.device.type)
    return module


def is_sharded(module: nn.Module) -> bool:
    DTensor, _ = _dtensor()
    return any(isinstance(p, DTensor) for p in module.parameters())


@torch.no_grad()
def _gather(value: Any, is_main: bool) -> Any:
    """A DTensor -> the whole tensor on rank 0's CPU (None elsewhere); anything else as it is (on the CPU)."""
    DTensor, _ = _dtensor()
    if isinstance(value, DTensor):
        whole = value.full_tensor()  # collective: every rank must call it, in the same order
        return whole.detach().cpu() if is_main else None
    return value.detach().cpu() if torch.is_tensor(value) else value


def full_state(module: nn.Module, dist) -> dict[str, torch.Tensor]:
    """module.state_dict() with every shard gathered: on rank 0 the whole tensors (CPU), on other ranks {}."""
    out, seen = {}, {}
    for name, value in module.state_dict(keep_vars=True).items():  # tied weights: one gather, one tensor
        if id(value) not in seen:
            seen[id(value)] = _gather(value, dist.is_main)
        out[name] = seen[id(value)]
    return out if dist.is_main else {}


class ShardedOptimizer:
    """An optimizer over sharded parameters, seen as the one-process optimizer by `grpo_kd.train.checkpoint`:
    `state_dict()` gathers (collective; whole tensors on rank 0), `load_state_dict` cuts to this rank's shards."""

    def __init__(self, optimizer: torch.optim.Optimizer, dist):
        self.optimizer, self.dist = optimizer, dist

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        state_dict = self.optimizer.state_dict()
        state = {index: {name: _gather(value, self.dist.is_main) for name, value in entries.items()}
                 for index, entries in sorted(state_dict["state"].items())}
        return {"state": state, "param_groups": state_dict["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        DTensor, distribute_tensor = _dtensor()
        params = self._params()
        state = {}
        for index, entries in state_dict["state"].items():
            param = params[int(index)]
            state[index] = {
                name: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape else value
                for name, value in entries.items()
            }
        self.optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a replicated DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
