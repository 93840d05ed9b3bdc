"""One phase of one iteration: the single entry point below every caller that runs the loop.

    result = run_phase(cfg, "rollout", iteration=1, shard=0, num_shards=2)
    print(result.line)        # the phase's one-line summary

The phase commands (`grpo-kd rollout|cache-teacher|update`), `grpo-kd run` (one process per phase, or all in one
with `--in-process`), the demo and the benchmarks all run a phase through `run_phase`, so there is one answer to
"how does a phase run". It knows nothing of the command line or of SLURM: the caller resolves which shard this
process owns (`grpo_kd.shards.resolve_shard` reads `--shard`/`--num-shards` and the SLURM array variables) and
passes it in. Each phase's numbers also reach the run's trackers (TensorBoard, W&B; grpo_kd/train/tracking.py):
the update's per step, the rollout's and the teacher pass's as one summary.

Before any work a phase checks its inputs (`preflight.check_inputs`: the config's rules, its model directories,
prompts and vocabularies) and takes the lock of its task, `RUN/locks/iter_NNNN-<phase>[-<shard>].lock`
(`grpo_kd.locks`): a second process on the same task is refused with one line naming the first, so two updates
of one iteration never write one metrics log. A full disk or a read-only file system is one line naming the
phase, not a traceback.

Phase 0, "sft" (iteration 0; grpo_kd/train/sft.py), fine-tunes the student before iteration 1 when `sft.enabled`,
and is trained, stopped and resumed as the update is. With `sft.enabled`, a phase of iteration 1 refuses to start
before phase 0 has written its checkpoint, so no caller can sample from or train the untuned student by mistake.

Sharding: the rollout writes shard `shard` of `num_shards` (default: `rollout.num_shards`); the teacher pass is
task `shard` of `num_shards` (default 1: one task scores every rollout shard); the update is never sharded here
(data parallelism comes from torchrun). An update stopped by SIGTERM/SIGUSR2 after its checkpoint raises
`UpdateInterrupted`; callers turn it into the requeue exit code or a message.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError, describe_os_error
from grpo_kd.locks import hold_lock
from grpo_kd.paths import PHASES, SFT_PHASE, TRAINING_PHASES, RunPaths, iteration_name
from grpo_kd.train.preflight import check_inputs
from grpo_kd.train.rollout import rollout_shard
from grpo_kd.train.sft import run_sft
from grpo_kd.train.teacher_pass import run_teacher_pass
from grpo_kd.train.tracking import Tracker, log_phase
from grpo_kd.train.update import UpdateInterrupted, run_update

__all__ = ["PHASES", "SFT_PHASE", "PhaseResult", "UpdateInterrupted", "default_num_shards", "run_phase"]


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
    """Run `phase` of `iteration` (shard `shard` of `num_shards`); a finished phase returns at once. Phase "sft"
    is iteration 0."""
    check_phase(cfg, phase, iteration)
    n = default_num_shards(cfg, phase) if num_shards is None else num_shards
    if not 0 <= shard < n:
        raise GrpoKdError(f"shard {shard} is out of range for {n} shard(s): expected 0 <= shard < {n}")
    training = phase in TRAINING_PHASES
    if training and n != 1:
        raise GrpoKdError(f"the {phase} is one job; its data parallelism comes from torchrun, not from shards")
    check_inputs(cfg, [phase])
    tracker = None if training else Tracker.for_run(cfg)  # a training phase mirrors its metrics log itself
    started = time.monotonic()
    what = f"iteration {iteration} {phase}" + ("" if training else f" shard {shard}")
    with hold_lock(RunPaths.of(cfg.run_dir).lock(task_lock_name(phase, iteration, shard)), what):
        try:
            if phase == SFT_PHASE:
                summary = run_sft(cfg, resume=resume)
            elif phase == "rollout":
                summary = rollout_shard(cfg, iteration, shard, n, show_progress=show_progress)
            elif phase == "cache-teacher":
                summary = run_teacher_pass(cfg, iteration=iteration, task=shard, num_tasks=n, progress=show_progress)
            else:
                summary = run_update(cfg, iteration, resume=resume)
        except Exception as exc:  # an OSError, or a library's error around one (see describe_os_error)
            why = describe_os_error(exc)
            if why is None:
                raise
            raise GrpoKdError(f"{why} in {cfg.run_dir} during {what}; what was finished is kept: fix it and run "
                              "again") from None
    seconds = time.monotonic() - started
    if tracker is not None:
        log_phase(tracker, RunPaths.of(cfg.run_dir).metrics, phase, iteration, shard, n, summary, seconds)
    line = str(summary) if training else summary.line()
    return PhaseResult(phase, iteration, shard, n, line, seconds)


def task_lock_name(phase: str, iteration: int, shard: int) -> str:
    """The lock of one phase task: `iter_0001-rollout-0`, `iter_0001-cache-teacher-2`, `iter_0001-update`,
    `iter_0000-sft` (the ranks of a torchrun update other than 0 each lock their own `-rankR`, so a second launch
    is refused on all)."""
    name = f"{iteration_name(iteration)}-{phase}"
    if phase not in TRAINING_PHASES:
        return f"{name}-{shard}"
    rank = int(os.environ.get("RANK", "0") or 0)
    return name if rank == 0 else f"{name}-rank{rank}"


def check_phase(cfg: Config, phase: str, iteration: int) -> None:
    """One line for a phase or iteration that does not exist, or an iteration 1 that would skip phase 0."""
    if phase == SFT_PHASE:
        if iteration != 0:
            raise GrpoKdError(f"sft is phase 0, before iteration 1: it has no iteration {iteration}")
        if not cfg.sft.enabled:  # else iteration 1 would start from a phase the config says is not there
            raise GrpoKdError("sft.enabled is false: set sft.enabled=true (grpo-kd run and chain submit then run "
                              "phase 0 too)")
        return
    if phase not in PHASES:
        raise GrpoKdError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)} or {SFT_PHASE}")
    if iteration < 1:
        raise GrpoKdError(f"iteration must be at least 1, got {iteration}")
    sft = RunPaths.of(cfg.run_dir).checkpoint(0)
    if iteration == 1 and cfg.sft.enabled and not sft.is_dir():
        raise GrpoKdError(f"sft.enabled: iteration 1 starts from phase 0's checkpoint {sft}, which does not exist; "
                          "run `grpo-kd sft` first (grpo-kd run and chain submit do)")
