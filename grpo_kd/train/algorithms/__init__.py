"""The update phase's algorithms: one module each over the shared functions of `common.py` (no base class).

Every module satisfies the `Algorithm` protocol below (a module is a valid implementation of a
`typing.Protocol`), and the update loop is typed against it; tests/train/test_algorithms.py checks each module
against it. See common.py for the loss normalisation that makes micro-batches x accumulation x ranks equal one
big batch.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch

from grpo_kd.cache.reader import CacheBatch
from grpo_kd.config import ALGORITHMS, Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.train.algorithms import grpo, minillm, ppo, privileged, self_distill
from grpo_kd.train.algorithms.common import Context, Prepared


class Algorithm(Protocol):
    """What the update loop needs of an algorithm."""

    NEEDS_TOKEN_LEVEL: bool  # reads the teacher's per-token top-k, which needs one shared vocabulary
    NEEDS_VALUE_HEAD: bool  # PPO's critic

    def prepare(self, batch: CacheBatch, cfg: Config, ctx: Context) -> Prepared:
        """Once per iteration per batch of whole groups, without gradients: named rewards and advantages."""
        ...

    def micro_loss(self, micro: CacheBatch, prepared: Prepared, cfg: Config,
                   ctx: Context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's differentiable loss (already scaled to its share of the step) and its metrics."""
        ...


_MODULES = {"grpo": grpo, "ppo": ppo, "minillm": minillm, "self_distill": self_distill, "privileged": privileged}
assert tuple(_MODULES) == ALGORITHMS


def get(name: str) -> Algorithm:
    if name not in _MODULES:
        raise GrpoKdError(f"unknown loss.algorithm {name!r}; expected one of {', '.join(_MODULES)}")
    return cast(Algorithm, _MODULES[name])
