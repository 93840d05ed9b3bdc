"""The local executor behind `grpo-kd run`: the chain's phases one after another on this machine.

    cfg, paths = prepare_run(cfg, iterations=2)      # RUN/config.yaml, which every phase reads
    run_local(cfg, paths)                            # each phase in its own process; logs in RUN/logs/
    run_local(cfg, paths, in_process=True)           # `grpo-kd run --in-process`: the same phases in this process

Key design choices:
- Each phase (each shard of a sharded phase) is its own `python -m grpo_kd.cli.app <phase> ...` process, the
  same command a SLURM job runs, so the memory of one model is returned before the next is loaded and a crash in
  a phase cannot take the executor with it.
- Before the first phase runs, every phase's inputs are checked (`grpo_kd.train.preflight`): a missing teacher
  or a vocabulary mismatch is refused before the rollout spends its time.
- Resuming needs no state of its own: a phase (or shard) whose outputs exist and match their checksums is skipped
  (plan.py: a damaged or swapped shard is done again, with a message naming it), and update always gets
  `--resume`, so a second `grpo-kd run` continues exactly where the first one stopped.
- One executor per run directory: `RUN/locks/run.lock` (grpo_kd.locks) refuses a second `grpo-kd run` (or a
  `chain submit`) with one line naming the first; each phase also locks its own task.
- Ctrl-C, SIGTERM or SIGHUP (a closed terminal) is passed on to the phase as SIGTERM, which an update phase
  answers by checkpointing and exiting with the requeue code; the phase runs in its own session, so the
  terminal's SIGINT reaches only the executor, which then waits for the phase to finish its checkpoint. A phase
  dies with its executor (PR_SET_PDEATHSIG = SIGTERM, Linux): after a SIGKILL of `grpo-kd run` no orphan phase
  goes on beside the next run (`chain submit` is the way to run phases detached).
- `in_process=True` calls the same phase function (`grpo_kd.train.phases.run_phase`, which the phase commands
  call too) in this process instead: no Python start-up, imports and library initialisation per phase (5-20 s
  each on a CPU, more than a tiny model's work), for small models on one machine. The price: memory is freed but not handed back to the OS between
  phases, output goes to the terminal instead of RUN/logs/, and Ctrl-C stops the phase where it is (every file is
  written atomically, so the next run resumes from the last finished phase or update checkpoint); SIGTERM still
  reaches an update as a checkpoint request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.locks import hold_lock
from grpo_kd.paths import PHASES, TRAINING_PHASES, RunPaths, iteration_name
from grpo_kd.slurm.plan import Step, chain_steps, damaged_outputs, num_tasks, phase_args, task_done
from grpo_kd.train.signals import REQUEUE_EXIT_CODE

STOP_GRACE_SECONDS = 300  # how long a stopped phase may take to write its checkpoint before it is killed


class PhaseFailed(GrpoKdError):
    """A phase exited non-zero; the message names it and its log."""


class Interrupted(GrpoKdError):
    """The executor was asked to stop (Ctrl-C, SIGTERM); the phase stopped cleanly where it could."""


@dataclass(frozen=True)
class LocalTask:
    """One process: a phase of an iteration, or one shard of a sharded phase."""

    step: Step
    task: int | None  # shard index of a sharded phase; None: the phase is one process
    tasks: int

    @property
    def label(self) -> str:
        return self.step.label + (f" (shard {self.task + 1}/{self.tasks})" if self.task is not None else "")

    def log(self, paths: RunPaths) -> Path:
        shard = f"-shard{self.task}" if self.task is not None else ""
        return paths.logs / f"{iteration_name(self.step.iteration)}-{self.step.phase}{shard}.log"


def local_tasks(cfg: Config) -> list[LocalTask]:
    tasks = []
    for step in chain_steps(cfg):
        n = num_tasks(cfg, step.phase)
        tasks += [LocalTask(step, j if n > 1 else None, n) for j in range(n)]
    return tasks


def run_local(cfg: Config, paths: RunPaths, *, console: Console | None = None, python: str = sys.executable,
              in_process: bool = False) -> None:
    """Run every unfinished phase of the chain in order; raise `PhaseFailed` at the first that fails."""
    console = console or Console(stderr=True)
    tasks = local_tasks(cfg)
    with hold_lock(paths.lock("run"), f"a run of {paths.root}"):
        if any(not task_done(cfg, paths, t.step, t.task or 0, t.tasks) for t in tasks):
            from grpo_kd.train.preflight import check_inputs  # the training stack: imported only when work is left

            check_inputs(cfg, PHASES)
        if in_process:
            _run_in_process(cfg, paths, tasks, console)
        else:
            _run_subprocesses(cfg, paths, tasks, console, python)


def _is_done(cfg: Config, paths: RunPaths, task: LocalTask, console: Console) -> bool:
    """The executor's "done": outputs present and matching their checksums; a damaged output is named."""
    if not task_done(cfg, paths, task.step, task.task or 0, task.tasks):
        return False
    damaged = damaged_outputs(cfg, paths, task.step, task.task or 0, task.tasks)
    for path in damaged:
        console.print(f"  [yellow]![/] {task.label}: {path} does not match the sha256 in its manifest (damaged or "
                      "replaced): doing it again", highlight=False, soft_wrap=True)
    return not damaged


def _run_subprocesses(cfg: Config, paths: RunPaths, tasks: list[LocalTask], console: Console, python: str) -> None:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())  # fmt: skip
    with _stop_on_signals(), Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"run {cfg.name}", total=len(tasks))
        for task in tasks:
            if _is_done(cfg, paths, task, progress.console):
                progress.console.print(f"  [dim]· {task.label}: done before[/]", highlight=False)
            else:
                progress.update(bar, description=task.label)
                seconds = run_task(task, paths, python=python)
                progress.console.print(f"  [green]✓[/] {task.label} [dim]({seconds:.1f} s)[/]", highlight=False)
            progress.advance(bar)
    console.print(f"run {cfg.name}: all {cfg.iterations} iterations done in {paths.root}", highlight=False)


def _run_in_process(cfg: Config, paths: RunPaths, tasks: list[LocalTask], console: Console) -> None:
    """The in-process variant of `run_local`: plain lines instead of a live display, which the phases' own
    progress bars would collide with."""
    with _stop_on_signals():
        for number, task in enumerate(tasks, start=1):
            where = f"[{number}/{len(tasks)}] {task.label}"
            if _is_done(cfg, paths, task, console):
                console.print(f"  [dim]· {where}: done before[/]", highlight=False)
                continue
            console.print(f"  [bold]▶[/] {where}", highlight=False)
            seconds = run_task_in_process(task, cfg, console)
            console.print(f"  [green]✓[/] {where} [dim]({seconds:.1f} s)[/]", highlight=False)
    console.print(f"run {cfg.name}: all {cfg.iterations} iterations done in {paths.root}", highlight=False)


def run_task_in_process(task: LocalTask, cfg: Config, console: Console) -> float:
    """Run one phase in this process through `run_phase` (what the phase command runs); returns its wall time.

    The training stack is imported here, not at the top: the default executor (a process per phase) needs it only
    for the preflight, and only when work is left; importing it costs about 5 s of torch and transformers
    (`python -X importtime`)."""
    from grpo_kd.device import release_memory
    from grpo_kd.train.phases import UpdateInterrupted, run_phase

    step = task.step
    try:
        result = run_phase(cfg, step.phase, step.iteration, shard=task.task or 0, num_shards=task.tasks,
                           resume=step.phase in TRAINING_PHASES)
    except _Stop:
        raise Interrupted(f"stopped during {task.label}; run the same command again to resume from the last "
                          "finished phase or update checkpoint") from None
    except UpdateInterrupted:
        raise Interrupted(f"{task.label} stopped on a signal after checkpointing; run again to resume") from None
    except GrpoKdError as exc:
        raise PhaseFailed(f"{task.label} failed: {exc}") from None
    finally:
        release_memory()  # the phase's models are unreachable now: free them before the next phase loads its own
    console.print(f"    {result.line}", highlight=False, soft_wrap=True)
    return result.seconds


def run_task(task: LocalTask, paths: RunPaths, *, python: str = sys.executable) -> float:
    """Run one phase process with its output appended to its log; returns its wall time in seconds."""
    args = phase_args(task.step, paths.config, task=task.task, tasks=task.tasks if task.task is not None else None)
    log = task.log(paths)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} grpo-kd {' '.join(args)}\n".encode())
        out.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([python, "-m", "grpo_kd.cli.app", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent())  # fmt: skip
        try:
            code = proc.wait()
        except _Stop:
            code = _stop(proc)
            raise Interrupted(
                f"stopped during {task.label} (exit {code}); run the same command again to resume; log: {log}"
            ) from None
    if code == REQUEUE_EXIT_CODE:
        raise Interrupted(f"{task.label} stopped on a signal after checkpointing; run again to resume; log: {log}")
    if code != 0:
        raise PhaseFailed(f"{task.label} failed (exit {code}); log: {log}{_last_line(log)}")
    return time.monotonic() - started


def _die_with_parent():
    """A `preexec_fn` that makes the child receive SIGTERM when this process dies, however it dies (Linux
    prctl PR_SET_PDEATHSIG; it survives the exec). The libc call is looked up here, in the parent: the child only
    calls it. None where prctl does not exist (not Linux): phases then outlive a killed executor."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the executor died before the prctl: act as the signal would have
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _Stop(BaseException):
    """Raised in the executor by SIGINT/SIGTERM/SIGHUP (a BaseException, so no phase code path swallows it)."""


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    def handler(signum, frame):  # noqa: ARG001
        raise _Stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop(proc: subprocess.Popen) -> int:
    """Ask the phase to checkpoint and stop (SIGTERM), wait for it, and kill it if it takes too long."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abandon a checkpoint half-written
    proc.terminate()
    try:
        return proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _last_line(log: Path) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    except OSError:
        return ""
    return f" — {lines[-1][:200]}" if lines and not lines[-1].startswith("==>") else ""
