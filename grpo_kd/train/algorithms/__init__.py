"""The update phase's algorithms, one module each over the shared functions of `common.py` (no base class).

Each module has `NEEDS_TOKEN_LEVEL`, `NEEDS_VALUE_HEAD`, `prepare(batch, cfg, ctx) -> Prepared` and
`micro_loss(micro, prepared, cfg, ctx) -> (loss, metrics)`; see common.py for the contract and the loss
normalisation that makes micro-batches x accumulation x ranks equal one big batch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from grpo_kd.errors import GrpoKdError

NAMES = ("grpo", "ppo", "minillm", "self_distill", "privileged")


def get(name: str) -> ModuleType:
    if name not in NAMES:
        raise GrpoKdError(f"unknown loss.algorithm {name!r}; expected one of {', '.join(NAMES)}")
    return importlib.import_module(f"grpo_kd.train.algorithms.{name}")
