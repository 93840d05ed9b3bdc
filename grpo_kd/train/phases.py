"""One phase of one iteration: the single entry point below every caller that runs the loop.

    result = run_phase(cfg, "rollout", iteration=1, shard=0, num_shards=2)
    print(result.line)        # the phase's one-line summary

The phase commands (`grpo-kd rollout|cache-teacher|update`), `grpo-kd run` (one process per phase, or all in one
with `--in-process`), the demo and the benchmarks all run a phase through `run_phase`, so there is one answer to
"how does a phase run". It knows nothing of the command line or of SLURM: the caller resolves which shard this
process owns (`grpo_kd.shards.resolve_shard` reads `--shard`/`--num-shards` and the SLURM array variables) and
passes it in. Each phase's numbers also reach the run's trackers (TensorBoard, W&B; grpo_kd/train/tracking.py):
the update's per step, the rollout's and the teacher pass's as one summary.

Sharding: the rollout writes shard `shard` of `num_shards` (default: `rollout.num_shards`); the teacher pass is
task `shard` of `num_shards` (default 1: one task scores every rollout shard); the update is never sharded here
(data parallelism comes from torchrun). An update stopped by SIGTERM/SIGUSR2 after its checkpoint raises
`UpdateInterrupted`; callers turn it into the requeue exit code or a message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.paths import PHASES, RunPaths
from grpo_kd.train.rollout import rollout_shard
from grpo_kd.train.teacher_pass import run_teacher_pass
from grpo_kd.train.teacher_vocab import check_teacher_vocabulary
from grpo_kd.train.tracking import Tracker, log_phase
from grpo_kd.train.update import UpdateInterrupted, run_update

__all__ = ["PHASES", "PhaseResult", "UpdateInterrupted", "default_num_shards", "run_phase"]


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    iteration: int
    shard: int
    num_shards: int
    line: str  # the one-line summary a phase command prints
    seconds: float


def default_num_shards(cfg: Config, phase: str) -> int:
    """How many shards a phase is cut into when the caller does not say: the rollout's configured count; one
    teacher task for all rollout shards; one update."""
    return cfg.rollout.num_shards if phase == "rollout" else 1


def run_phase(cfg: Config, phase: str, iteration: int, *, shard: int = 0, num_shards: int | None = None,
              resume: bool = False, show_progress: bool = True) -> PhaseResult:
    """Run `phase` of `iteration` (shard `shard` of `num_shards`); a finished phase returns at once."""
    if phase not in PHASES:
        raise GrpoKdError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    if iteration < 1:
        raise GrpoKdError(f"iteration must be at least 1, got {iteration}")
    n = default_num_shards(cfg, phase) if num_shards is None else num_shards
    if not 0 <= shard < n:
        raise GrpoKdError(f"shard {shard} is out of range for {n} shard(s): expected 0 <= shard < {n}")
    if phase == "update" and n != 1:
        raise GrpoKdError("the update is one job; its data parallelism comes from torchrun, not from shards")
    check_teacher_vocabulary(cfg)  # what a teacher with another vocabulary cannot serve, before any work
    tracker = Tracker.for_run(cfg) if phase != "update" else None  # the update mirrors its metrics log itself
    started = time.monotonic()
    if phase == "rollout":
        summary = rollout_shard(cfg, iteration, shard, n, show_progress=show_progress)
    elif phase == "cache-teacher":
        summary = run_teacher_pass(cfg, iteration=iteration, task=shard, num_tasks=n, progress=show_progress)
    else:
        summary = run_update(cfg, iteration, resume=resume)
    seconds = time.monotonic() - started
    if tracker is not None:
        log_phase(tracker, RunPaths.of(cfg.run_dir).metrics, phase, iteration, shard, n, summary, seconds)
    line = str(summary) if phase == "update" else summary.line()
    return PhaseResult(phase, iteration, shard, n, line, seconds)
