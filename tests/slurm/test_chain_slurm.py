"""`grpo-kd chain` against a real single-node SLURM (started by the `local_slurm` fixture; skipped without one).

1. A two-iteration chain with two-task arrays, in a run directory whose path has spaces, quotes and `$(...)`,
   completes, and leaves a run directory that `grpo-kd cache verify` accepts.
2. An update that receives the pre-timeout signal checkpoints, exits 75, is requeued by its script, resumes
   exactly where it stopped, and the chain completes. The test delivers the signal itself, the way slurmctld
   delivers `--signal=B:USR2@N` (`scancel --batch --signal=USR2`: the batch shell only), once the update is
   training: SLURM's own timer checks time limits only every ~30 s, so with `--time=1` USR2 comes anywhere
   from 10 to 40 s into the job, and no fixed amount of training is both sure to be still running then and
   short enough for CI on a machine whose speed varies fivefold. (With the timer, seen here: 18-26 s.)
3. A failing cache-teacher task cancels the update that depends on it; `chain status` names the failed phase
   and its log; after the config is fixed, `chain resume` submits from the failed phase and the chain completes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from run_config import broken_teacher, write_run_config
from grpo_kd.cli.app import main
from grpo_kd.slurm.plan import load_run
from grpo_kd.slurm.status import JobRecord, chain_status, describe_failures

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NASTY = "it's a \"$(touch PWNED)\" run"


def wait_for_chain(run_dir: Path, timeout: float, *, until_failed: bool = False, on_poll=None):
    """Poll `chain_status` until every phase is done (or one failed); returns the rows."""
    deadline = time.monotonic() + timeout
    while True:
        cfg, paths = load_run(run_dir)
        rows = chain_status(cfg, paths)
        if on_poll is not None:
            on_poll(rows)
        failures = describe_failures(rows)
        if until_failed and failures and not any(r.active for r in rows):
            return rows
        if failures and not until_failed:
            pytest.fail("a phase failed: " + "; ".join(failures) + "\n" + _tail(rows))
        if all(r.done for r in rows) and not any(r.active for r in rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"the chain did not finish in {timeout:.0f} s:\n" + "\n".join(map(str, rows)) + _tail(rows))
        time.sleep(2)


def _tail(rows) -> str:
    logs = [p for r in rows if r.log is not None for p in r.log.parent.glob(r.log.name)]
    return "".join(f"\n--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs)


def test_two_iterations_with_a_two_task_array_complete(tmp_path, tiny_models, local_slurm, capsys):
    root = tmp_path / NASTY
    config = write_run_config(tmp_path / "run.yaml", root, tiny_models, iterations=2,
                              rollout={"num_shards": 2}, teacher={"num_shards": 2})  # fmt: skip
    started = time.monotonic()
    assert main(["chain", "submit", "--config", str(config)]) == 0
    run_dir = root / "run"
    rows = wait_for_chain(run_dir, timeout=900)
    print(f"two-iteration chain: {time.monotonic() - started:.0f} s")
    assert [r.state for r in rows] == ["COMPLETED"] * 6
    records = JobRecord.load_all(load_run(run_dir)[1])
    assert [(r.phase, r.tasks) for r in records] == [("rollout", 2), ("cache-teacher", 2), ("update", 1)] * 2
    assert (run_dir / "checkpoints" / "iter_0002" / "trainer_state.json").is_file()
    assert len(list((run_dir / "slurm" / "logs").glob("*.log"))) == 2 * (2 + 2 + 1)
    verify = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "cache", "verify", str(run_dir)],
                            capture_output=True, text=True)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    capsys.readouterr()
    assert main(["chain", "status", str(run_dir)]) == 0
    assert capsys.readouterr().out.count("COMPLETED") == 6


def test_pre_timeout_signal_checkpoints_requeues_and_completes(tmp_path, tiny_models, local_slurm):
    config = write_run_config(tmp_path / "run.yaml", tmp_path / "runs", tiny_models,
                              optim={"epochs_per_iteration": 100},  # 400 optimizer steps
                              slurm={"signal_seconds": 50})  # fmt: skip
    started = time.monotonic()
    assert main(["chain", "submit", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    cfg, paths = load_run(run_dir)
    update_job = JobRecord.load_all(paths)[-1].job_id
    deadline = time.monotonic() + 600
    while len(_metric_steps(paths.metrics)) < 3:  # the update is training
        assert time.monotonic() < deadline, "the update did not start training"
        time.sleep(0.1)
    # What `--signal=B:USR2@50` makes slurmctld do 50 s before the limit, now: USR2 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR2", update_job], check=True)
    signalled_at = time.monotonic() - started

    rows = wait_for_chain(run_dir, timeout=900)
    print(f"requeue chain: {time.monotonic() - started:.0f} s (signalled after {signalled_at:.0f} s)")
    assert rows[-1].state == "COMPLETED" and "requeued 1x" in rows[-1].detail
    log = (run_dir / "slurm" / "logs" / f"iter_0001-update-{update_job}.log").read_text()
    assert "stopped by SIGUSR2 after checkpoint" in log  # the phase's own message: it checkpointed
    assert "requeueing it" in log  # the script's
    assert paths.checkpoint(1).is_dir() and not list(paths.checkpoints.glob("iter_0001.step-*"))
    assert _metric_steps(paths.metrics) == list(range(1, 401))  # resumed exactly where it stopped


def _metric_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def test_a_failed_phase_cancels_its_dependents_and_resume_finishes(tmp_path, tiny_models, local_slurm, capsys):
    broken = {"num_shards": 2, "path": str(broken_teacher(tmp_path, tiny_models))}  # fails only when loaded
    config = write_run_config(tmp_path / "run.yaml", tmp_path / "runs", tiny_models, iterations=2,
                              rollout={"num_shards": 2}, teacher=broken)  # fmt: skip
    started = time.monotonic()
    assert main(["chain", "submit", "--config", str(config), "--iterations", "1"]) == 0
    run_dir = tmp_path / "runs" / "run"
    rows = wait_for_chain(run_dir, timeout=600, until_failed=True)
    assert [(r.step.phase, r.state, r.failed) for r in rows] == [
        ("rollout", "COMPLETED", False), ("cache-teacher", "FAILED", True), ("update", "CANCELLED", False)
    ]  # fmt: skip
    assert "DependencyNeverSatisfied" in rows[2].detail
    capsys.readouterr()
    assert main(["chain", "status", str(run_dir)]) == 0
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "iteration 1 cache-teacher FAILED" in failed[0]
    log = Path(failed[0].split("; log: ")[1])
    assert log.is_file() and "broken-teacher" in log.read_text()  # the log says what was wrong

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # fix the saved config, as a user would
    saved["teacher"]["path"] = str(tiny_models.teacher)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["chain", "resume", str(run_dir)]) == 0
    resumed = [line for line in capsys.readouterr().out.splitlines() if line[:2] in {"1.", "2.", "3."}]
    assert [line.split()[3] for line in resumed] == ["cache-teacher", "update"]  # the rollout is not redone
    rows = wait_for_chain(run_dir, timeout=600)
    print(f"failure + resume: {time.monotonic() - started:.0f} s")
    assert (run_dir / "checkpoints" / "iter_0001").is_dir()
