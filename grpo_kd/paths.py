"""The layout of a run directory (DESIGN.md §3 "Files"), in one place.

    runs/NAME/config.yaml
    runs/NAME/iter_0001/rollouts/part-00000.arrow + manifest.json
    runs/NAME/iter_0001/teacher/part-00000.{arrow,zarr} + manifest.json
    runs/NAME/checkpoints/iter_0001/               (iter_0000: the SFT phase's, when it ran)
    runs/NAME/logs/metrics.jsonl
    runs/NAME/slurm/
    runs/NAME/reports/
    runs/NAME/locks/                 one lock file per executor and per phase task (grpo_kd.locks)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


PHASES = ("rollout", "cache-teacher", "update")  # the phases of an iteration, in order
SFT_PHASE = "sft"  # phase 0, before iteration 1 (optional): writes checkpoints/iter_0000, iteration 1's student
# the phases that train the student: one job each (data parallel under torchrun), resumed from step checkpoints
TRAINING_PHASES = (SFT_PHASE, "update")


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:04d}"


def part_name(shard: int, suffix: str) -> str:
    return f"part-{shard:05d}.{suffix}"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, root: str | Path) -> "RunPaths":
        return cls(Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def iteration(self, iteration: int) -> Path:
        return self.root / iteration_name(iteration)

    def rollouts(self, iteration: int) -> Path:
        return self.iteration(iteration) / "rollouts"

    def teacher(self, iteration: int) -> Path:
        return self.iteration(iteration) / "teacher"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / iteration_name(iteration)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        return self.logs / "metrics.jsonl"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def lock(self, name: str) -> Path:
        """The lock file of `name`: "run" (the executor) or a phase task, e.g. "iter_0001-update"."""
        return self.root / "locks" / f"{name}.lock"
