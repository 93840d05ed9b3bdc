"""`grpo-kd evaluate`, `grpo-kd report` and `grpo-kd export`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from grpo_kd.cli._common import CONFIG_OPTION, OVERRIDES_ARGUMENT, RUN_ARGUMENT, setup_logging
from grpo_kd.config import load_config
from grpo_kd.errors import GrpoKdError

_ITERATION = re.compile(r"^iter_(\d+)$")


def _config(config: Optional[Path], overrides: Optional[list[str]], run_dir: Optional[Path]):
    """--config, else the run's resolved config.yaml when the checkpoint is in a run, else the defaults."""
    if config is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        config = run_dir / "config.yaml"
    return load_config(config, overrides or [])


def _read_baseline(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise GrpoKdError(f"baseline {path}: not a readable JSON report: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("diversity", data).get("distinct_2"), (int, float)):
        raise GrpoKdError(f"baseline {path}: holds no diversity numbers (distinct_2)")
    return data


def _auto_baseline(reports: Path, iteration: Optional[int]) -> Optional[dict]:
    """The diversity of the run's earliest evaluation before `iteration` (the initial model's, ideally)."""
    from grpo_kd.evaluate.report import read_evaluations

    if iteration is None or not reports.is_dir():
        return None
    earlier = [e for e in read_evaluations(reports) if "diversity" in e and (e.get("iteration") if e.get("iteration") is not None else -1) < iteration]
    return earlier[0] if earlier else None


def evaluate(
    checkpoint: Path = typer.Option(..., help="Model or checkpoint directory to evaluate (or a hub id)."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher model directory (distill suite; default: teacher.path, or with teacher.kind=self_privileged the informed self)."),
    suite: Optional[str] = typer.Option(None, help="Comma list of foqa,perplexity,distill,diversity,euroeval (default: eval.suites)."),
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    out: Optional[Path] = typer.Option(None, help="Reports directory (default: RUN/reports for a run's checkpoint, else ./reports)."),
    name: Optional[str] = typer.Option(None, help="Report name, e.g. iter_0000 for the initial model (default: from the checkpoint)."),
    foqa: Optional[str] = typer.Option(None, help="FoQA file or dataset (default: eval.foqa)."),
    text: Optional[Path] = typer.Option(None, help="Held-out text for perplexity (default: eval.heldout_text)."),
    baseline: Optional[Path] = typer.Option(None, help="Earlier report JSON whose diversity is the collapse baseline."),
) -> None:
    """Evaluate a checkpoint: FoQA, perplexity, distillation metrics, diversity, EuroEval."""
    from grpo_kd.evaluate.report import report_name, save_evaluation
    from grpo_kd.evaluate.suite import evaluate_checkpoint, locate_run

    setup_logging()
    run_dir, iteration = locate_run(checkpoint)
    cfg = _config(config, overrides, run_dir)
    reports = out or (run_dir / "reports" if run_dir is not None else Path("reports"))
    name = name or report_name(checkpoint, iteration)
    match = _ITERATION.match(name)
    iteration = int(match.group(1)) if match else iteration
    base = _read_baseline(baseline) if baseline else _auto_baseline(reports, iteration)
    result = evaluate_checkpoint(
        checkpoint, teacher, suites=suite or cfg.eval.suites, cfg=cfg, foqa=foqa, texts=str(text) if text else None, baseline=base,
        euroeval_dir=reports / "euroeval" / name,
    )
    result["iteration"] = iteration
    paths = save_evaluation(result, reports, name)
    out_console = Console()
    for warning in result["warnings"]:
        out_console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    out_console.print(paths["md"].read_text(encoding="utf-8").split("\n\n## FoQA")[0], markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}", highlight=False)


def report(run_dir: Path = RUN_ARGUMENT) -> None:
    """Learning curves and per-iteration evaluations of a run, as PNG plots and a markdown table."""
    from grpo_kd.evaluate.report import curves_headline, read_metrics, run_report

    written = run_report(run_dir)
    metrics = Path(run_dir) / "logs" / "metrics.jsonl"
    if metrics.is_file():
        Console().print(f"learning curves: {curves_headline(read_metrics(metrics))}", highlight=False, soft_wrap=True)
    Console().print("\n".join(f"wrote {path}" for path in written.values()), highlight=False)


def export(
    checkpoint: Path = typer.Argument(..., help="Full weights, a LoRA adapter, or RUN/checkpoints/iter_NNNN."),
    out: Path = typer.Argument(..., help="Directory of the standalone model (replaced if it exists)."),
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    dtype: str = typer.Option("auto", help="float32, bfloat16 or float16 (auto: model.dtype, else the base's)."),
) -> None:
    """A standalone transformers model from a checkpoint: a LoRA adapter merged into its base, safetensors, the
    tokenizer and chat template beside it; for EuroEval, vLLM and the hub."""
    from grpo_kd.evaluate.export import export_checkpoint
    from grpo_kd.evaluate.suite import locate_run

    setup_logging()
    run_dir, _ = locate_run(checkpoint)
    has_config = config is not None or overrides or (run_dir is not None and (run_dir / "config.yaml").is_file())
    cfg = _config(config, overrides, run_dir) if has_config else None  # else the checkpoint says its own base
    written = export_checkpoint(checkpoint, out, cfg, dtype=dtype)
    Console().print(f"wrote {written} (load it with AutoModelForCausalLM.from_pretrained)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("report")(report)
    app.command("export")(export)
