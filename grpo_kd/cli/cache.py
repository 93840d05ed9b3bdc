"""`grpo-kd cache verify` and `grpo-kd cache stats`: check and describe a run's teacher caches."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from grpo_kd.cli._common import RUN_ARGUMENT

stdout = Console()  # results go to stdout; errors and progress to stderr

cache_app = typer.Typer(help="Check and describe teacher caches.", no_args_is_help=True)


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
    app.add_typer(cache_app, name="cache")
