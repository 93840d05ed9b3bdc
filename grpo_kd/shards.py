"""Which shard `j` of `n` this process owns: from `--shard J --num-shards N`, else from the SLURM array.

Every sharded phase (rollout, cache-teacher) asks `resolve_shard` so that a task of a SLURM array and a run by
hand agree on the same rule:

    j = --shard,      else SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN (MIN taken as 0 when unset), else 0
    n = --num-shards, else SLURM_ARRAY_TASK_COUNT,                                                   else the config's

Subtracting SLURM_ARRAY_TASK_MIN makes `--array=1-4` mean shards 0..3, like `--array=0-3`. Anything out of
range (j < 0, j >= n, n < 1, a variable that is not an integer) is a one-line `GrpoKdError`.
"""

from __future__ import annotations

import os
from typing import Mapping

from grpo_kd.errors import GrpoKdError

TASK_ID = "SLURM_ARRAY_TASK_ID"
TASK_COUNT = "SLURM_ARRAY_TASK_COUNT"
TASK_MIN = "SLURM_ARRAY_TASK_MIN"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise GrpoKdError(f"{name}={text!r} is not an integer") from None


def resolve_shard(
    shard: int | None,
    num_shards: int | None,
    default_num_shards: int,
    *,
    env: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """`(j, n)` from the flags, else the SLURM array variables, else `(0, default_num_shards)`; validated."""
    env = os.environ if env is None else env
    if shard is None:
        task_id = _env_int(env, TASK_ID)
        if task_id is not None:
            shard = task_id - (_env_int(env, TASK_MIN) or 0)
    if num_shards is None:
        num_shards = _env_int(env, TASK_COUNT)
    j = 0 if shard is None else shard
    n = default_num_shards if num_shards is None else num_shards
    if n < 1:
        raise GrpoKdError(f"the number of shards must be at least 1, got {n}")
    if not 0 <= j < n:
        raise GrpoKdError(f"shard {j} is out of range for {n} shard(s): expected 0 <= shard < {n}")
    return j, n


def shard_range(num_items: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The contiguous block `[start, stop)` of `num_items` that shard `j` of `n` owns (sizes differ by at most 1)."""
    return shard * num_items // num_shards, (shard + 1) * num_items // num_shards
