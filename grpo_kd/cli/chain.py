"""`grpo-kd run`, `grpo-kd demo` and `grpo-kd chain submit|status|resume`: the loop, here or on SLURM."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import CONFIG_OPTION, OVERRIDES_ARGUMENT, RUN_ARGUMENT, not_available, resolve_config

chain_app = typer.Typer(help="Submit the loop to SLURM as dependent jobs, and follow it.", no_args_is_help=True)


def run(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iterations: Optional[int] = typer.Option(None, help="Iterations to run (default: the config's)."),
) -> None:
    """Run rollout -> cache-teacher -> update for each iteration on this machine, resuming where it stopped."""
    resolve_config(config, overrides)
    not_available("grpo-kd run", issue=6)


def demo(
    corpus: Optional[list[Path]] = typer.Option(None, help="Text to build the tiny models from (default: built-in)."),
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo run goes."),
) -> None:
    """Build a tiny teacher and student, run a few iterations, evaluate, and print a before/after table."""
    not_available("grpo-kd demo", issue=6)


@chain_app.command("submit")
def submit(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iterations: Optional[int] = typer.Option(None, help="Iterations to submit (default: the config's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the scripts and the order; submit nothing."),
) -> None:
    """Write sbatch scripts for each phase and iteration and submit them with afterok dependencies."""
    resolve_config(config, overrides)
    not_available("chain submit", issue=6)


@chain_app.command("status")
def status(run_dir: Path = RUN_ARGUMENT) -> None:
    """Show each phase's state (from squeue/scontrol and the run directory)."""
    not_available("chain status", issue=6)


@chain_app.command("resume")
def resume(run_dir: Path = RUN_ARGUMENT) -> None:
    """Submit again from the first phase that is not finished."""
    not_available("chain resume", issue=6)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("demo")(demo)
    app.add_typer(chain_app, name="chain")
