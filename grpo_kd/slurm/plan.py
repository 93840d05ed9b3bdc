"""The chain of phases of a run, and when each is done, read from the run directory alone.

    steps = chain_steps(cfg)                  # iteration 1 rollout, cache-teacher, update, iteration 2 ...
    step_done(cfg, paths, steps[0])           # the phase's outputs exist
    first_unfinished(cfg, paths, steps)       # where `chain resume` and `grpo-kd run` start again

Key design choice: "done" is a property of files, never of a scheduler's memory. Both executors (SLURM and the
local one) and `chain status` ask the same question, so a chain can move between them: a run started with
`grpo-kd run` can be finished with `chain resume` and the other way round. A phase is done when

    sft              checkpoints/iter_0000/ exists (phase 0, first in the chain when sft.enabled)
    rollout          rollouts/manifest.json exists and every rollout shard 0..n-1 has its manifest and data
    cache-teacher    every rollout shard i has its teacher shard i (teacher shard i scores rollout shard i)
    update           checkpoints/iter_NNNN/ exists (it is renamed into place only when complete)

`step_done` and `task_done` answer "is it there", cheaply (chain status asks it of every step). The local
executor also asks `damaged_outputs` (`task_done(..., verify=True)`): a rollout or teacher shard whose data no
longer matches the sha256 in its manifest is not done, and `grpo-kd run` does it again. The shards of an
iteration whose update is done are not read again: nothing will read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpo_kd.cache.manifest import (
    INDEX_NAME,
    checksum,
    read_json,
    shard_data_path,
    shard_is_complete,
    shard_manifest_path,
)
from grpo_kd.config import Config, check, load_config, save_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.paths import PHASES, SFT_PHASE, TRAINING_PHASES, RunPaths, iteration_name

ROLLOUT_SUFFIX = "arrow"


@dataclass(frozen=True)
class Step:
    """One phase of one iteration: one SLURM job (an array for sharded phases), or one or more local processes."""

    iteration: int  # 0 for phase 0 (sft)
    phase: str  # one of PHASES, or SFT_PHASE

    @property
    def key(self) -> str:
        return f"{iteration_name(self.iteration)}/{self.phase}"

    @property
    def label(self) -> str:
        return "phase 0 sft" if self.phase == SFT_PHASE else f"iteration {self.iteration} {self.phase}"


def chain_steps(cfg: Config, iterations: int | None = None) -> list[Step]:
    """Phase 0 (sft) when `sft.enabled`, then each iteration's phases."""
    count = cfg.iterations if iterations is None else iterations
    first = [Step(0, SFT_PHASE)] if cfg.sft.enabled else []
    return first + [Step(i, phase) for i in range(1, count + 1) for phase in PHASES]


def num_tasks(cfg: Config, phase: str) -> int:
    """Processes (array tasks) a phase runs as: its shard count; update is one job."""
    return {"rollout": cfg.rollout.num_shards, "cache-teacher": cfg.teacher.num_shards}.get(phase, 1)


def phase_args(step: Step, config_path: Path, *, task: int | None = None, tasks: int | None = None) -> list[str]:
    """The `grpo-kd` arguments of a step; `task`/`tasks` for a local process of a sharded phase.

    Under SLURM a sharded phase reads SLURM_ARRAY_TASK_ID/COUNT instead. update and sft always get `--resume`: they
    continue from a mid-phase checkpoint when there is one (after a requeue or a kill) and start fresh otherwise.
    """
    args = [step.phase, "--config", str(config_path)]
    if step.phase != SFT_PHASE:
        args += ["--iteration", str(step.iteration)]
    if task is not None:
        args += ["--shard", str(task), "--num-shards", str(tasks)]
    if step.phase in TRAINING_PHASES:
        args.append("--resume")
    return args


# ---------------------------------------------------------------------------------------------- done?


def rollout_shard_done(paths: RunPaths, iteration: int, shard: int) -> bool:
    return shard_is_complete(paths.rollouts(iteration), shard, ROLLOUT_SUFFIX, verify_checksum=False)


def teacher_shard_done(cfg: Config, paths: RunPaths, iteration: int, shard: int) -> bool:
    return shard_is_complete(paths.teacher(iteration), shard, cfg.teacher.cache_format, verify_checksum=False)


def task_done(cfg: Config, paths: RunPaths, step: Step, task: int, tasks: int, *, verify: bool = False) -> bool:
    """Whether task `task` of `tasks` of a sharded phase has nothing left to do; `verify` also reads its outputs
    against their checksums (`damaged_outputs`)."""
    if verify and task_done(cfg, paths, step, task, tasks):
        return not damaged_outputs(cfg, paths, step, task, tasks)
    if step.phase == "rollout":
        return rollout_shard_done(paths, step.iteration, task)
    if step.phase == "cache-teacher":  # task j scores the rollout shards i with i % tasks == j
        shards = range(task, cfg.rollout.num_shards, tasks)
        return all(teacher_shard_done(cfg, paths, step.iteration, i) for i in shards)
    return step_done(cfg, paths, step)


def task_outputs(cfg: Config, paths: RunPaths, step: Step, task: int, tasks: int) -> list[tuple[Path, int]]:
    """(directory, shard) of the shards task `task` of `tasks` writes (none for the update)."""
    if step.phase == "rollout":
        return [(paths.rollouts(step.iteration), task)]
    if step.phase == "cache-teacher":
        return [(paths.teacher(step.iteration), i) for i in range(task, cfg.rollout.num_shards, tasks)]
    return []


def damaged_outputs(cfg: Config, paths: RunPaths, step: Step, task: int, tasks: int) -> list[Path]:
    """The finished data files of the task whose bytes no longer match the sha256 in their manifest (a flipped
    bit, a file copied over them). Empty when the iteration's update is done: its inputs are not read again."""
    if paths.checkpoint(step.iteration).is_dir():
        return []
    damaged = []
    for directory, shard in task_outputs(cfg, paths, step, task, tasks):
        manifest_path = shard_manifest_path(directory, shard)
        if not manifest_path.is_file():
            continue
        manifest = read_json(manifest_path)
        suffix = ROLLOUT_SUFFIX if step.phase == "rollout" else cfg.teacher.cache_format
        data = shard_data_path(directory, shard, suffix)
        if data.exists() and checksum(data) != manifest.get("sha256"):
            damaged.append(data)
    return damaged


def step_done(cfg: Config, paths: RunPaths, step: Step) -> bool:
    i = step.iteration
    if step.phase == "rollout":  # the shard that finishes last writes the merged index
        index = paths.rollouts(i) / INDEX_NAME
        return index.is_file() and all(rollout_shard_done(paths, i, j) for j in range(cfg.rollout.num_shards))
    if step.phase == "cache-teacher":
        return step_done(cfg, paths, Step(i, "rollout")) and all(
            teacher_shard_done(cfg, paths, i, j) for j in range(cfg.rollout.num_shards)
        )
    if step.phase in TRAINING_PHASES:  # sft: iteration 0
        return paths.checkpoint(i).is_dir()
    raise ValueError(f"unknown phase {step.phase!r}")


def first_unfinished(cfg: Config, paths: RunPaths, steps: list[Step]) -> int:
    """Index of the first step that is not done (len(steps) when all are)."""
    for index, step in enumerate(steps):
        if not step_done(cfg, paths, step):
            return index
    return len(steps)


# ---------------------------------------------------------------------------------------------- the run dir


def prepare_run(cfg: Config, iterations: int | None = None) -> tuple[Config, RunPaths]:
    """Resolve what a chain needs to be reproducible and save it as RUN/config.yaml, which every phase reads.

    The run directory becomes absolute (the phases may run elsewhere), and `iterations` is recorded so that
    `chain resume` and a second `grpo-kd run` know where the chain ends.
    """
    if iterations is not None:
        cfg.iterations = iterations
        check(cfg)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().absolute())
    paths = RunPaths.of(cfg.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)
    return cfg, paths


def load_run(run_dir: str | Path) -> tuple[Config, RunPaths]:
    """The saved config of a run directory (written by `prepare_run`)."""
    paths = RunPaths.of(Path(run_dir).expanduser().absolute())
    if not paths.config.is_file():
        raise GrpoKdError(f"{paths.root} is not a run directory: {paths.config} is missing")
    cfg = load_config(paths.config)
    if cfg.run_dir.absolute() != paths.root:  # the directory was moved or copied: follow it
        cfg.output_dir, cfg.name = str(paths.root.parent), paths.root.name
        save_config(cfg, paths.config)
    return cfg, paths
