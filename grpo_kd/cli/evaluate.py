"""`grpo-kd evaluate` and `grpo-kd report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import CONFIG_OPTION, OVERRIDES_ARGUMENT, RUN_ARGUMENT, not_available


def evaluate(
    checkpoint: Path = typer.Option(..., help="Model or checkpoint directory to evaluate."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher model directory (for the distill suite)."),
    suite: str = typer.Option("perplexity,distill,diversity", help="Comma list: foqa,perplexity,distill,diversity,euroeval."),
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
) -> None:
    """Evaluate a checkpoint: FoQA, perplexity, distillation metrics, diversity, EuroEval."""
    not_available("evaluate", issue=7)


def report(run_dir: Path = RUN_ARGUMENT) -> None:
    """Learning curves and per-iteration evaluations of a run, as PNG plots and a markdown table."""
    not_available("report", issue=7)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("report")(report)
