"""`grpo-kd cache-teacher`, `grpo-kd cache verify` and `grpo-kd cache stats`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import (
    CONFIG_OPTION,
    ITERATION_OPTION,
    OVERRIDES_ARGUMENT,
    RUN_ARGUMENT,
    not_available,
    resolve_config,
)

cache_app = typer.Typer(help="Check and describe teacher caches.", no_args_is_help=True)


def cache_teacher(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    shard: Optional[int] = typer.Option(None, help="Shard index J (default: SLURM_ARRAY_TASK_ID or 0)."),
    num_shards: Optional[int] = typer.Option(None, help="Number of shards N (default: SLURM_ARRAY_TASK_COUNT)."),
) -> None:
    """Score the iteration's rollouts with the teacher and write its top-k log-probs to the cache."""
    resolve_config(config, overrides)
    not_available("cache-teacher", issue=4)


@cache_app.command("verify")
def verify(run_dir: Path = RUN_ARGUMENT, iteration: Optional[int] = typer.Option(None, "--iteration", "-i")) -> None:
    """Check schema, checksums, counts and values of a run's teacher caches; exit 1 naming each bad shard."""
    not_available("cache verify", issue=4)


@cache_app.command("stats")
def stats(run_dir: Path = RUN_ARGUMENT, iteration: Optional[int] = typer.Option(None, "--iteration", "-i")) -> None:
    """Bytes per token, top-k mass coverage, teacher entropy and top-1 agreement, with a PNG plot."""
    not_available("cache stats", issue=4)


def register(app: typer.Typer) -> None:
    app.command("cache-teacher")(cache_teacher)
    app.add_typer(cache_app, name="cache")
