"""Issue 13, case 5: no orphaned phase, no second update beside the first, SIGHUP handled like SIGTERM.

`grpo-kd run` and every phase task hold a lock under RUN/locks/ (fcntl.flock: released by the kernel when the
holder dies); the phases `grpo-kd run` starts die with it (PR_SET_PDEATHSIG), and SIGHUP stops the executor and
its phase the way SIGTERM does: the update checkpoints after its current step.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

import psutil
import pytest

from grpo_kd.errors import GrpoKdError

LONG = {"optim.epochs_per_iteration": 200}  # 800 optimizer steps: still training when the test acts


def _grpo_kd(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_kd.cli.app", *args]


def _steps(paths) -> list[int]:
    if not paths.metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in paths.metrics.read_text().splitlines() if line.strip()]


def _wait_for_training(proc, paths, steps: int = 3) -> None:
    deadline = time.monotonic() + 300
    while len(_steps(paths)) < steps:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the update did not start training within 5 minutes"
        time.sleep(0.2)


def _gone(processes, seconds: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    for process in alive:
        process.kill()
    return not alive


def _start_run(tmp_path, fault_config):
    """`grpo-kd run` (a process per phase) of a run whose rollout and teacher pass are done (here, in this
    process, to save two phase start-ups): it starts with the update."""
    from grpo_kd.config import save_config
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.train.phases import run_phase

    cfg, paths = prepare_run(fault_config(**LONG))
    run_phase(cfg, "rollout", 1)
    run_phase(cfg, "cache-teacher", 1)
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    proc = subprocess.Popen(_grpo_kd("run", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, paths


def test_a_stale_lock_is_taken_over_with_a_message(fault_config, caplog):
    from grpo_kd.paths import RunPaths
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.train.phases import run_phase

    cfg = fault_config()
    prepare_run(cfg)
    lock = RunPaths.of(cfg.run_dir).root / "locks" / "iter_0001-rollout-0.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 4_000_000, "host": "node7", "command": "grpo-kd rollout", "started": "x"}))
    with caplog.at_level(logging.WARNING):
        run_phase(cfg, "rollout", 1)
    assert any("taking over" in r.getMessage() and "pid 4000000 on node7" in r.getMessage() for r in caplog.records)
    assert lock.read_text() == ""  # released


@pytest.mark.slow
def test_a_second_update_of_one_iteration_is_refused_while_the_first_runs(tmp_path, fault_config):
    from grpo_kd.config import save_config
    from grpo_kd.paths import RunPaths
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.train.phases import run_phase

    cfg, paths = prepare_run(fault_config(**LONG))
    run_phase(cfg, "rollout", 1)
    run_phase(cfg, "cache-teacher", 1)
    save_config(cfg, tmp_path / "run.yaml")
    first = subprocess.Popen(_grpo_kd("update", "--config", str(tmp_path / "run.yaml"), "--iteration", "1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_training(first, RunPaths.of(cfg.run_dir))
        with pytest.raises(GrpoKdError) as refused:
            run_phase(cfg, "update", 1, resume=True)
        assert "iteration 1 update is already running" in str(refused.value)
        assert f"pid {first.pid}" in str(refused.value)
    finally:
        first.terminate()  # SIGTERM: it checkpoints after its step and exits
        first.communicate(timeout=300)
    steps = _steps(paths)
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once, in order


@pytest.mark.slow
def test_sighup_stops_run_and_its_phase_like_sigterm(tmp_path, fault_config):
    from grpo_kd.train.checkpoint import step_checkpoints

    proc, paths = _start_run(tmp_path, fault_config)
    _wait_for_training(proc, paths)
    phases = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGHUP)  # the terminal was closed
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "stopped during iteration 1 update" in " ".join(out.split())
    assert _gone(phases, 30), "the update went on after its executor stopped"
    assert step_checkpoints(paths.checkpoint(1)), "the update did not checkpoint"


@pytest.mark.slow
def test_the_phase_of_a_killed_executor_stops_and_the_next_run_resumes_it(tmp_path, fault_config):
    from grpo_kd.train.checkpoint import step_checkpoints

    proc, paths = _start_run(tmp_path, fault_config)
    _wait_for_training(proc, paths)
    phases = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # SIGKILL: the executor cannot pass anything on
    proc.communicate(timeout=60)
    assert _gone(phases, 60), "the update went on as an orphan after its executor was killed"
    steps = _steps(paths)
    assert steps == list(range(1, len(steps) + 1))
    saved = step_checkpoints(paths.checkpoint(1))
    assert saved and saved[-1].name.endswith(f"{steps[-1]:07d}")  # it checkpointed on the way out: resumable
