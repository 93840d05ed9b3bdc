"""Submit a run's chain to SLURM: one sbatch script per phase and iteration, each `afterok` on the one before.

    cfg, paths = prepare_chain(cfg, iterations=2)       # resolves and saves RUN/config.yaml
    submitted = submit_chain(cfg, paths)                # sbatch --parsable ..., ids in RUN/slurm/jobs.json
    submit_chain(cfg, paths, resume=True)               # `chain resume`: from the first unfinished phase

Key design choices:
- The chain starts at the first phase whose outputs are missing (plan.first_unfinished), so `submit` after a
  finished iteration and `resume` after a failure both pick up exactly where the files say.
- Every job depends on the job before it with `afterok` and `--kill-on-invalid-dep=yes`: a failed phase
  cancels everything after it instead of leaving it pending forever.
- `resume` never duplicates: a step whose latest job is still pending or running keeps that job (the new jobs
  depend on it), as long as every step before it kept its job too; a still-queued job behind a step that has to
  be submitted again is cancelled, because its dependency is dead.
- Job ids are written to jobs.json after every single sbatch, so a submission cut short is still on record.
- Before anything is submitted the phases' inputs are checked (`grpo_kd.train.preflight`), and the submission
  holds the run directory's lock (`RUN/locks/run.lock`), which `grpo-kd run` holds too: one executor at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_write_text
from grpo_kd.locks import hold_lock
from grpo_kd.paths import PHASES, RunPaths
from grpo_kd.slurm.plan import Step, chain_steps, first_unfinished, num_tasks
from grpo_kd.slurm.scripts import bin_dir, log_pattern, render_script, script_path
from grpo_kd.slurm.status import ACTIVE, JobRecord, latest_jobs, query_jobs


class SlurmError(GrpoKdError):
    """sbatch or scontrol refused, or is missing."""


@dataclass
class Submission:
    step: Step
    script: Path
    text: str  # the script
    job_id: str | None  # None in a dry run
    dependency: str | None  # the job id (or, in a dry run, the step) it waits for
    kept: bool = False  # an active job from before, not submitted again


def prepare_chain(cfg: Config, iterations: int | None = None, *, write: bool = True) -> tuple[Config, RunPaths]:
    """Resolve the run directory, the jobs' working directory and the tools' directory; save RUN/config.yaml."""
    from grpo_kd.slurm.plan import prepare_run

    resolve_job_dirs(cfg)
    if write:
        return prepare_run(cfg, iterations)
    if iterations is not None:
        cfg.iterations = iterations
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().absolute())
    return cfg, RunPaths.of(cfg.run_dir)


def resolve_job_dirs(cfg: Config) -> bool:
    """Fill in `slurm.workdir` (here) and `slurm.bin_dir` (this Python's); True when either was missing."""
    missing = not cfg.slurm.workdir or not cfg.slurm.bin_dir
    cfg.slurm.workdir = str(Path(cfg.slurm.workdir or os.getcwd()).expanduser().absolute())
    cfg.slurm.bin_dir = str(bin_dir(cfg))
    return missing


def submit_chain(
    cfg: Config,
    paths: RunPaths,
    *,
    resume: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[Submission]:
    """Write and submit the scripts of every step from the first unfinished one; returns them in order."""
    if dry_run:
        return _submit_chain(cfg, paths, resume=resume, dry_run=True, echo=echo)
    with hold_lock(paths.lock("run"), f"a run or submission of {paths.root}"):
        return _submit_chain(cfg, paths, resume=resume, dry_run=False, echo=echo)


def _submit_chain(cfg: Config, paths: RunPaths, *, resume: bool, dry_run: bool,
                  echo: Callable[[str], None]) -> list[Submission]:
    from grpo_kd.train.preflight import check_inputs  # the training stack: only when there is something to submit

    steps = chain_steps(cfg)
    start = first_unfinished(cfg, paths, steps)
    if start == len(steps):
        echo(f"every phase of {paths.root} is done ({cfg.iterations} iterations)")
        return []
    if not dry_run and shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: run `grpo-kd run` on a machine without SLURM")
    if not dry_run:  # a dry run shows the scripts of a config written for another machine, too
        check_inputs(cfg, PHASES)
    records = JobRecord.load_all(paths)
    active = {} if dry_run else _active_jobs(records)
    if active and not resume:
        ids = ", ".join(sorted(active.values(), key=int))
        raise SlurmError(f"jobs {ids} of {paths.root} are still queued or running: follow them with "
                         f"`grpo-kd chain status`, or cancel them (scancel) before submitting again")  # fmt: skip
    submitted: list[Submission] = []
    previous: str | None = None
    keeping = True  # still in the prefix of steps whose active jobs are kept
    for step in steps[start:]:
        path = script_path(paths, step)
        text = render_script(cfg, paths, step)
        if keeping and step.key in active:
            previous = active[step.key]
            submitted.append(Submission(step, path, text, previous, None, kept=True))
            continue
        keeping = False
        if step.key in active:
            _cancel(active[step.key], echo)
        if dry_run:
            dependency = previous
            submitted.append(Submission(step, path, text, None, dependency))
            previous = f"<{step.label}>"
            continue
        atomic_write_text(path, text)
        path.chmod(0o755)
        (paths.slurm / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create it
        job_id = sbatch(path, previous)
        records.append(JobRecord(step.key, step.iteration, step.phase, job_id, num_tasks(cfg, step.phase), str(path),
                                 str(log_pattern(paths, step, array=num_tasks(cfg, step.phase) > 1))))
        JobRecord.save_all(paths, records)
        submitted.append(Submission(step, path, text, job_id, previous))
        previous = job_id
    return submitted


def sbatch(script: Path, after: str | None) -> str:
    """Submit one script; returns the job id (an array's id for an array)."""
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    done = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise SlurmError(f"sbatch refused {script.name}: {message[-1] if message else f'exit {done.returncode}'}")
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {done.stdout.strip()!r} for {script.name}, not a job id")
    return job_id


def _active_jobs(records: list[JobRecord]) -> dict[str, str]:
    """`{step key: job id}` of the steps whose latest job SLURM still has queued or running."""
    live = query_jobs()
    if live is None:
        raise SlurmError("scontrol is not available, so the state of the submitted jobs cannot be checked")
    active = {}
    for key, record in latest_jobs(records).items():
        tasks = live.get(record.job_id)
        if tasks and any(task.state in ACTIVE for task in tasks):
            active[key] = record.job_id
    return active


def _cancel(job_id: str, echo: Callable[[str], None]) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, text=True)
    echo(f"cancelled job {job_id}: it waited on a phase that is submitted again")


def describe_submissions(submitted: list[Submission], *, dry_run: bool) -> list[str]:
    """The submission order, one line per step."""
    lines = []
    for n, s in enumerate(submitted, 1):
        if s.kept:
            what = f"job {s.job_id} (already queued or running: kept)"
        else:
            after = f" after {s.dependency}" if s.dependency else ""
            what = f"{'would submit' if dry_run else 'job ' + str(s.job_id)}{after}"
        lines.append(f"{n}. {s.step.label:<28} {what}   {s.script}")
    return lines
