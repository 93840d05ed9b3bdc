"""`grpo-kd rollout` and `grpo-kd update`: the student's two phases of an iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import CONFIG_OPTION, ITERATION_OPTION, OVERRIDES_ARGUMENT, resolve_config, setup_logging


def rollout(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    shard: Optional[int] = typer.Option(None, help="Shard index J (default: SLURM_ARRAY_TASK_ID or 0)."),
    num_shards: Optional[int] = typer.Option(
        None, help="Number of shards N (default: SLURM_ARRAY_TASK_COUNT, else rollout.num_shards)."
    ),
) -> None:
    """Sample G completions per prompt with the current student and store them with their log-probs."""
    from grpo_kd.slurm.shards import resolve_shard
    from grpo_kd.train.rollout import rollout_shard

    cfg = resolve_config(config, overrides)
    setup_logging()
    j, n = resolve_shard(shard, num_shards, cfg.rollout.num_shards)
    summary = rollout_shard(cfg, iteration, j, n, show_progress=True)
    typer.echo(summary.line())


def update(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of this phase."),
) -> None:
    """Train the student on the rollouts and the teacher cache, then write the iteration's checkpoint.

    Under `torchrun` every rank runs this; SIGTERM / SIGUSR2 checkpoint and exit with the requeue code."""
    from grpo_kd.train.signals import REQUEUE_EXIT_CODE
    from grpo_kd.train.update import UpdateInterrupted, run_update

    cfg = resolve_config(config, overrides)
    setup_logging()
    try:
        final = run_update(cfg, iteration, resume=resume)
    except UpdateInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(REQUEUE_EXIT_CODE) from None
    typer.echo(str(final))


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout)
    app.command("update")(update)
