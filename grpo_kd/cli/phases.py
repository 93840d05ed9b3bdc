"""`grpo-kd rollout` and `grpo-kd update`: the student's two phases of an iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import CONFIG_OPTION, ITERATION_OPTION, OVERRIDES_ARGUMENT, not_available, resolve_config


def rollout(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    shard: Optional[int] = typer.Option(None, help="Shard index J (default: SLURM_ARRAY_TASK_ID or 0)."),
    num_shards: Optional[int] = typer.Option(None, help="Number of shards N (default: SLURM_ARRAY_TASK_COUNT)."),
) -> None:
    """Sample G completions per prompt with the current student and store them with their log-probs."""
    resolve_config(config, overrides)
    not_available("the rollout phase", issue=5)


def update(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of this phase."),
) -> None:
    """Train the student on the rollouts and the teacher cache, then write the iteration's checkpoint."""
    resolve_config(config, overrides)
    not_available("the update phase", issue=5)


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout)
    app.command("update")(update)
