"""`grpo-kd run`: the chain on this machine, interrupted in the middle of an update and run again.

Shows that Ctrl-C reaches the update as a stop request (it checkpoints and the executor stops with one line
naming the phase), and that the second `grpo-kd run` skips the finished phases (their files are untouched) and
continues the update from its step checkpoint: the metrics log ends with every optimizer step exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from run_config import broken_teacher, write_run_config
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import step_checkpoints

pytestmark = pytest.mark.slow

EPOCHS = 25  # 4 optimizer steps per epoch: long enough to be interrupted in the middle


def _grpo_kd(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_kd.cli.app", *args]


def _metric_steps(paths: RunPaths) -> list[int]:
    if not paths.metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in paths.metrics.read_text().splitlines() if line.strip()]


def test_run_resumes_after_an_interrupted_update(tmp_path, tiny_models):
    config = write_run_config(tmp_path / "run.yaml", tmp_path / "runs", tiny_models,
                              optim={"epochs_per_iteration": EPOCHS})  # fmt: skip
    paths = RunPaths.of(tmp_path / "runs" / "run")
    first = subprocess.Popen(_grpo_kd("run", "--config", str(config)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(_metric_steps(paths)) < 3:  # the update is training
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the update did not start training within 5 minutes"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 1, out
    assert "stopped during iteration 1 update" in out and "run the same command again to resume" in out
    assert step_checkpoints(paths.checkpoint(1)), "the update did not checkpoint on the stop request"
    assert not paths.checkpoint(1).exists()
    rollout_mtime = (paths.rollouts(1) / "manifest.json").stat().st_mtime_ns

    second = subprocess.run(_grpo_kd("run", "--config", str(config)), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    for phase in ("rollout", "cache-teacher"):
        assert f"iteration 1 {phase}: done before" in second.stderr
    assert (paths.rollouts(1) / "manifest.json").stat().st_mtime_ns == rollout_mtime
    assert paths.checkpoint(1).is_dir() and not step_checkpoints(paths.checkpoint(1))
    assert _metric_steps(paths) == list(range(1, 4 * EPOCHS + 1))


def test_a_failing_phase_stops_the_run_with_one_line(tmp_path, tiny_models):
    """A teacher that only fails when it is loaded (a missing one is refused before the first phase)."""
    config = write_run_config(tmp_path / "run.yaml", tmp_path / "runs", tiny_models,
                              teacher={"path": str(broken_teacher(tmp_path, tiny_models))})  # fmt: skip
    done = subprocess.run(_grpo_kd("run", "--config", str(config)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    log = RunPaths.of(tmp_path / "runs" / "run").logs / "iter_0001-cache-teacher.log"
    assert last.startswith("error: iteration 1 cache-teacher failed (exit 1); log: ") and str(log) in last
    assert "broken-teacher" in log.read_text() and "cut short or damaged" in log.read_text()


def test_in_process_run_equals_the_process_per_phase_run(tmp_path, tiny_models):
    """`grpo-kd run --in-process` runs the same phase commands without a process each: same checkpoints and
    metrics to the last bit as the default executor, and a second call finds everything done."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("procs", ()), ("inproc", ("--in-process",))):
        config = write_run_config(tmp_path / f"{name}.yaml", tmp_path / "runs", tiny_models, name=name, iterations=2)
        done = subprocess.run(_grpo_kd("run", "--config", str(config), *extra), capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = RunPaths.of(tmp_path / "runs" / name)
    assert "in this process" in " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert not list(runs["inproc"].logs.glob("*.log"))  # its phases wrote to the terminal
    weights = {name: load_file(str(paths.checkpoint(2) / "model" / "model.safetensors")) for name, paths in runs.items()}
    assert weights["procs"].keys() == weights["inproc"].keys()
    for key, value in weights["procs"].items():
        assert (value == weights["inproc"][key]).all(), key
    losses = {name: [json.loads(line)["loss"] for line in paths.metrics.read_text().splitlines()]
              for name, paths in runs.items()}
    assert losses["procs"] == losses["inproc"] and len(losses["procs"]) >= 2

    again = subprocess.run(_grpo_kd("run", "--config", str(tmp_path / "inproc.yaml"), "--in-process"),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and (again.stdout + again.stderr).count("done before") == 6


def test_seeds_run_one_chain_per_seed(tmp_path, tiny_models):
    """`grpo-kd run --seeds 0,1`: NAME-s0 and NAME-s1, each with its own seed in its saved config, sampling other
    completions; a list that is not one is refused in one line before anything is written."""
    from grpo_kd.cache.rollouts import RolloutStore
    from grpo_kd.config import load_config

    config = write_run_config(tmp_path / "run.yaml", tmp_path / "runs", tiny_models, name="seeded")
    done = subprocess.run(_grpo_kd("run", "--config", str(config), "--in-process", "--seeds", "0,1"),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 seeds done; side by side: grpo-kd compare" in " ".join((done.stdout + done.stderr).split())
    completions = {}
    for seed in (0, 1):
        paths = RunPaths.of(tmp_path / "runs" / f"seeded-s{seed}")
        assert load_config(paths.config).seed == seed and paths.checkpoint(1).is_dir()
        completions[seed] = [list(r.completion_ids) for r in RolloutStore.open(paths.rollouts(1))]
    assert completions[0] != completions[1]
    bad = subprocess.run(_grpo_kd("run", "--config", str(config), "--seeds", "0,x", "name=other"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and "--seeds takes comma-separated integers" in bad.stderr + bad.stdout
    assert not (tmp_path / "runs" / "other-s0").exists()
