"""`grpo-kd cache-teacher`, `grpo-kd cache verify` and `grpo-kd cache stats`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from grpo_kd.cli._common import (
    CONFIG_OPTION,
    ITERATION_OPTION,
    OVERRIDES_ARGUMENT,
    RUN_ARGUMENT,
    resolve_config,
    setup_logging,
)

stdout = Console()  # results go to stdout; errors and progress to stderr

cache_app = typer.Typer(help="Check and describe teacher caches.", no_args_is_help=True)


def cache_teacher(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    shard: Optional[int] = typer.Option(None, help="Shard index J (default: SLURM_ARRAY_TASK_ID or 0)."),
    num_shards: Optional[int] = typer.Option(None, help="Number of shards N (default: SLURM_ARRAY_TASK_COUNT)."),
) -> None:
    """Score the iteration's rollouts with the teacher and write its top-k log-probs to the cache."""
    from grpo_kd.slurm.shards import resolve_shard
    from grpo_kd.train.teacher_pass import run_teacher_pass

    cfg = resolve_config(config, overrides)
    setup_logging()
    task, count = resolve_shard(shard, num_shards, default_num_shards=1)  # task 0 of 1 scores every shard
    result = run_teacher_pass(cfg, iteration=iteration, task=task, num_tasks=count, progress=True)
    done = ", ".join(map(str, result.shards_done)) or "none"
    skipped = ", ".join(map(str, result.shards_skipped)) or "none"
    stdout.print(f"cache-teacher task {task}/{count}: scored shard(s) {done} ({result.tokens} tokens); "
                  f"already complete: {skipped}", highlight=False)


@cache_app.command("verify")
def verify(run_dir: Path = RUN_ARGUMENT, iteration: Optional[int] = typer.Option(None, "--iteration", "-i")) -> None:
    """Check schema, checksums, counts and values of a run's teacher caches; exit 1 naming each bad shard."""
    from grpo_kd.cache.verify import verify_run

    report = verify_run(run_dir, iteration)
    for line in report.lines():
        stdout.print(line, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@cache_app.command("stats")
def stats(run_dir: Path = RUN_ARGUMENT, iteration: Optional[int] = typer.Option(None, "--iteration", "-i"),
          out: Optional[Path] = typer.Option(None, help="Output directory (default: RUN/reports).")) -> None:
    """Bytes per token, top-k mass coverage, teacher entropy and top-1 agreement, with a PNG plot."""
    from grpo_kd.cache.stats import run_stats

    for json_path, png_path, summary in run_stats(run_dir, iteration, out):
        stdout.print(summary, highlight=False, soft_wrap=True)
        stdout.print(f"wrote {json_path} and {png_path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("cache-teacher")(cache_teacher)
    app.add_typer(cache_app, name="cache")
