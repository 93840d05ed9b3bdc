"""`grpo-kd plan --config FILE`: the preflight of a chain (grpo_kd/slurm/planner.py), printed as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from grpo_kd.cli._common import CONFIG_OPTION, OVERRIDES_ARGUMENT, console


def plan(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    as_json: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON to this file."),
) -> None:
    """Check a run before submitting it: every config rule, the models, the vocabularies, shard counts and GPUs,
    and a memory model of each phase per GPU; exit 1 naming each problem."""
    from grpo_kd.config import load_config
    from grpo_kd.slurm.planner import make_plan

    cfg = load_config(config, overrides or [], check_rules=False)  # the plan lists every rule problem itself
    report = make_plan(cfg, config)
    print_plan(report, cfg, Console(width=max(110, console.width)))
    if as_json is not None:
        from grpo_kd.fsutil import atomic_write_json

        atomic_write_json(as_json, plan_dict(report))
    if report.problems:
        raise typer.Exit(1)


def print_plan(report, cfg, out: Console) -> None:
    from grpo_kd.slurm.planner import fmt_bytes, fmt_count

    models = Table(title="models", title_justify="left")
    for name in ("role", "model", "found", "parameters", "vocabulary", "layers x hidden"):
        models.add_column(name, overflow="fold")
    for m in report.models:
        f = m.facts
        models.add_row(m.role, m.name, m.source, fmt_count(f.text_parameters + f.vision_parameters) if f else "?",
                       str(f.vocab_size) if f else "?", f"{f.num_layers} x {f.hidden_size}" if f else "?")
    out.print(models)
    for mem in report.phases:
        table = Table(title=f"{mem.phase}: per GPU, {mem.gpus} GPU(s) of {cfg.slurm.gpu_memory_gb:g} GB",
                      title_justify="left")
        table.add_column("part")
        table.add_column("memory", justify="right")
        for part, value in mem.parts.items():
            table.add_row(part, fmt_bytes(value))
        verdict = "[green]fits[/]" if mem.fits else "[red]does not fit[/]"
        table.add_row(f"[bold]total[/] ({verdict})", f"[bold]{fmt_bytes(mem.total)}[/]")
        out.print(table)
        for note in mem.notes:
            out.print(f"  note: {escape(note)}", highlight=False)
    if report.work:
        work = Table(title="one iteration (time at 40% of slurm.gpu_tflops; decoding is usually slower)",
                     title_justify="left")
        for name in ("phase", "tokens", "FLOPs", "GPUs", "hours"):
            work.add_column(name, justify="right" if name != "phase" else "left")
        for phase, w in report.work.items():
            work.add_row(phase, fmt_count(w["tokens"]), fmt_count(w["flops"]), str(w["gpus"]), f"{w['hours']:.2f}")
        out.print(work)
    for note in report.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    for problem in report.problems:
        out.print(f"[bold red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if not report.problems:
        out.print("[green]plan ok[/]: nothing in the config or the files stops this run")


def plan_dict(report) -> dict:
    return {
        "models": [{"role": m.role, "name": m.name, "source": m.source,
                    "parameters": None if m.facts is None else m.facts.text_parameters + m.facts.vision_parameters}
                   for m in report.models],
        "phases": [{"phase": p.phase, "gpus": p.gpus, "available": p.available, "parts": p.parts, "total": p.total,
                    "fits": p.fits, "notes": p.notes} for p in report.phases],
        "work": report.work, "problems": report.problems, "notes": report.notes,
    }


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
