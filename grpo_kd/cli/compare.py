"""`grpo-kd compare RUN...`: runs side by side, with their spread over seeds (grpo_kd/evaluate/compare.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories; runs that differ only in their seed are grouped."),
    metric: Optional[list[str]] = typer.Option(
        None, "--metric", "-m", help="Metric to compare, e.g. distill/reverse_kl or train/reward/total (repeatable, or a "
        "comma list; default: every evaluation headline metric and the training reward)."),
    best: Optional[str] = typer.Option(None, help="Metric that picks each run's best checkpoint, METRIC[:max|min] "
                                       "(default: the first chosen metric with a known direction)."),
    interval: str = typer.Option("t95", help="Spread over seeds: t95 (mean with a 95% t interval) or minmax."),
    baseline: Optional[str] = typer.Option(None, help="Group every other group is compared with (default: the first)."),
    out: Path = typer.Option(Path("reports"), help="Directory of the markdown, JSON and PNG."),
    name: str = typer.Option("comparison", help="File name stem of the outputs."),
) -> None:
    """One table and one plot across runs: chosen metrics per iteration with their seed spread, each run's best
    checkpoint, and which differences are larger than the seed spread."""
    from grpo_kd.evaluate.compare import compare_runs
    from grpo_kd.evaluate.compare_report import write_comparison

    metrics = [m.strip() for item in metric or [] for m in item.split(",") if m.strip()] or None
    comparison = compare_runs(runs, metrics=metrics, method=interval, best=best, baseline=baseline)
    paths = write_comparison(comparison, out, name)
    console = Console()
    console.print(paths["md"].read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
