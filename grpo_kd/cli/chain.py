"""`grpo-kd run`, `grpo-kd demo` and `grpo-kd chain submit|status|resume`: the loop, here or on SLURM."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from grpo_kd.cli._common import (
    CONFIG_OPTION,
    OVERRIDES_ARGUMENT,
    RUN_ARGUMENT,
    console,
    fail,
    resolve_config,
    setup_logging,
)
from grpo_kd.config import Config, check
from grpo_kd.errors import GrpoKdError

chain_app = typer.Typer(help="Submit the loop to SLURM as dependent jobs, and follow it.", no_args_is_help=True)
ITERATIONS_OPTION = typer.Option(None, "--iterations", "-n", min=1, help="Iterations (default: the config's).")


def run(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iterations: Optional[int] = ITERATIONS_OPTION,
    in_process: bool = typer.Option(
        False, "--in-process",
        help="Run the phases inside this process instead of one process each: saves the start-up of every phase "
             "(seconds each), for small models; output goes to the terminal, not RUN/logs/.",
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds",
        help="Comma-separated seeds, e.g. 0,1,2: one run per seed, one after the other, named NAME-sSEED (the "
             "config's seed and name otherwise). Compare them with `grpo-kd compare`.",
    ),
) -> None:
    """Run rollout -> cache-teacher -> update for each iteration on this machine, resuming where it stopped."""
    from grpo_kd.slurm.local import run_local
    from grpo_kd.slurm.plan import prepare_run

    from grpo_kd.engines.vllm_engine import preflight
    from grpo_kd.train.teacher_vocab import check_teacher_vocabulary

    if in_process:
        setup_logging()  # the phases log here, as their own commands do; the default executor logs to RUN/logs
    cfg = resolve_config(config, overrides)
    preflight(cfg)  # what vLLM cannot serve is refused before anything is written
    check_teacher_vocabulary(cfg)  # and what a teacher with another vocabulary cannot (the rest: run_local)
    how = "in this process" if in_process else "each phase in its own process"
    runs = [cfg] if seeds is None else seeded_configs(cfg, seeds)
    for one in runs:
        one, paths = prepare_run(one, iterations)
        console.print(f"run {one.name}: {one.iterations} iterations in {paths.root} ({how}; config: {paths.config})",
                      highlight=False)
        run_local(one, paths, console=console, in_process=in_process)
    if len(runs) > 1:
        dirs = " ".join(shlex.quote(str(one.run_dir)) for one in runs)
        console.print(f"{len(runs)} seeds done; side by side: grpo-kd compare {dirs}", highlight=False)


def seeded_configs(cfg: Config, seeds: str) -> list[Config]:
    """One copy of `cfg` per seed of `seeds` ("0,1,2"), with that seed and the name NAME-sSEED."""
    try:
        values = [int(item) for item in seeds.split(",") if item.strip()]
    except ValueError:
        raise GrpoKdError(f"--seeds takes comma-separated integers such as 0,1,2, got {seeds!r}") from None
    if not values or len(set(values)) != len(values):
        raise GrpoKdError(f"--seeds needs at least one seed and no seed twice, got {seeds!r}")
    out = []
    for seed in values:
        one = copy.deepcopy(cfg)
        one.seed, one.name = seed, f"{cfg.name}-s{seed}"
        check(one)
        out.append(one)
    return out


def demo(
    corpus: Optional[list[Path]] = typer.Option(None, help="Text to build the tiny models from (default: built-in)."),
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo run goes."),
    iterations: int = typer.Option(3, min=1, help="Iterations of the loop."),
) -> None:
    """Build a tiny teacher and student, run a few iterations, evaluate, and print a before/after table."""
    from grpo_kd.demo import run_demo

    run_demo(out, corpus=corpus, iterations=iterations, console=console)


@chain_app.command("submit")
def submit(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iterations: Optional[int] = ITERATIONS_OPTION,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the scripts and the order; submit nothing."),
) -> None:
    """Check the run with `grpo-kd plan` (refused when the plan finds a problem), then write sbatch scripts for
    each phase and iteration and submit them with afterok dependencies."""
    from grpo_kd.engines.vllm_engine import preflight
    from grpo_kd.slurm.planner import make_plan
    from grpo_kd.slurm.submit import prepare_chain
    from grpo_kd.train.teacher_vocab import check_teacher_vocabulary

    cfg = resolve_config(config, overrides)
    found = make_plan(cfg, config).problems
    if found and not dry_run:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        fail(f"grpo-kd plan refuses this run: {found[0]}{more}; `grpo-kd plan --config FILE` shows them all")
    for problem in found:  # a dry run may be made where the models are not: the problems are shown, not fatal
        console.print(f"[yellow]plan:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if not dry_run:  # a dry run may be made where the models are not (their configs are read by the preflight)
        preflight(cfg)
        check_teacher_vocabulary(cfg)
    cfg, paths = prepare_chain(cfg, iterations, write=not dry_run)
    _submit(cfg, paths, resume=False, dry_run=dry_run)


@chain_app.command("status")
def status(
    run_dir: Path = RUN_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Show each phase's state (from squeue/scontrol and the run directory) and where a failed phase's log is."""
    from grpo_kd.slurm.plan import load_run
    from grpo_kd.slurm.status import chain_status, describe_failures

    cfg, paths = load_run(run_dir)
    rows = chain_status(cfg, paths)
    if as_json:
        print(json.dumps([_row_dict(r) for r in rows], indent=2))
        return
    table = Table(title=f"chain {paths.root}", title_justify="left")
    for name in ("iteration", "phase", "job", "SLURM", "output"):
        table.add_column(name)
    for r in rows:
        state = f"{r.state} ({r.detail})" if r.detail else r.state
        style = "red" if r.failed else ("green" if r.done else None)
        output = "done" if r.done else "missing"
        table.add_row(str(r.step.iteration), r.step.phase, r.job_id or "-", state, output, style=style)
    Console(width=max(120, console.width)).print(table)
    for line in describe_failures(rows):
        print(f"failed: {line}")


@chain_app.command("resume")
def resume(
    run_dir: Path = RUN_ARGUMENT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be submitted; submit nothing."),
) -> None:
    """Submit again from the first phase that is not finished (jobs still queued or running are kept)."""
    from grpo_kd.config import save_config
    from grpo_kd.slurm.plan import load_run
    from grpo_kd.slurm.submit import resolve_job_dirs

    cfg, paths = load_run(run_dir)
    if resolve_job_dirs(cfg) and not dry_run:  # a run started by `grpo-kd run`: record where the jobs run
        save_config(cfg, paths.config)
    _submit(cfg, paths, resume=True, dry_run=dry_run)


def _submit(cfg, paths, *, resume: bool, dry_run: bool) -> None:
    from grpo_kd.slurm.submit import describe_submissions, submit_chain

    submitted = submit_chain(cfg, paths, resume=resume, dry_run=dry_run, echo=print)
    if dry_run and submitted:
        for s in submitted:
            print(f"# ---- {s.script}\n{s.text}")
        print("# ---- submission order (dry run: nothing submitted)")
    for line in describe_submissions(submitted, dry_run=dry_run):
        print(line)
    if submitted and not dry_run:
        print(f"follow it with: grpo-kd chain status {shlex.quote(str(paths.root))}")


def _row_dict(r) -> dict:
    return {"iteration": r.step.iteration, "phase": r.step.phase, "job_id": r.job_id, "state": r.state,
            "detail": r.detail, "done": r.done, "failed": r.failed, "log": str(r.log) if r.log else None}  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("demo")(demo)
    app.add_typer(chain_app, name="chain")
