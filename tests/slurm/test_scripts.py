"""The sbatch scripts and the submission logic, without a cluster: fake `srun`, `sbatch`, `scontrol`, `scancel`.

What these show in seconds: every word of a script is quoted (a run directory with spaces, quotes and `$(...)`
reaches the phase as one argument and runs nothing); the trap forwards the pre-timeout signal and requeues on
exit 75; a dry run prints every script and the order and writes nothing; submission chains `afterok` with
`--kill-on-invalid-dep=yes`; resume keeps queued jobs and cancels stale ones; status names a failed array task's log.
The same behaviours against a real SLURM are in test_chain_slurm.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from grpo_kd.cli.app import main
from grpo_kd.config import load_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.slurm.plan import Step, chain_steps, prepare_run
from grpo_kd.slurm.scripts import render_script, sbatch_directives
from grpo_kd.slurm.status import JobRecord, JobTask, chain_status, describe_failures, query_jobs
from grpo_kd.slurm.submit import SlurmError, prepare_chain, submit_chain

ROOT = Path(__file__).resolve().parents[2]
NASTY = "it's a \"$(touch PWNED)\" `touch PWNED2` $HOME run"


def fake_tool(directory: Path, name: str, body: str) -> Path:
    """An executable Python script `name` in `directory`."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    directory = tmp_path / "fake bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return directory


def nasty_config(tmp_path, *overrides):
    cfg = load_config(None, ["teacher.num_shards=2", "rollout.num_shards=2", *overrides])
    cfg.output_dir = str(tmp_path / NASTY)
    cfg.slurm.bin_dir = str(tmp_path / "my env" / "bin")
    cfg.slurm.workdir = str(tmp_path / "work dir")
    return cfg


# ---------------------------------------------------------------------------------------------- quoting


def test_every_argument_is_quoted(tmp_path, fake_bin):
    cfg, paths = prepare_chain(nasty_config(tmp_path))
    fake_tool(fake_bin, "srun", """
        import json, os, sys
        open(os.path.join(os.environ["FAKE_DIR"], "srun.json"), "w").write(json.dumps(sys.argv[1:]))
    """)
    for step in chain_steps(cfg):
        script = tmp_path / "job.sh"
        script.write_text(render_script(cfg, paths, step))
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        done = subprocess.run(["bash", str(script), "extra arg"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "SLURM_JOB_ID": "7"})  # fmt: skip
        assert done.returncode == 0, done.stderr
        argv = json.loads((tmp_path / "srun.json").read_text())
        expected = [str(tmp_path / "my env" / "bin" / "grpo-kd"), step.phase, "--config", str(paths.config),
                    "--iteration", "1"] + (["--resume"] if step.phase == "update" else []) + ["extra arg"]  # fmt: skip
        assert argv == expected
    assert not list(tmp_path.rglob("PWNED*"))


def test_sbatch_directives_read_back_as_single_words(tmp_path):
    """sbatch reads a directive's argument with shell-like quoting (seen on SLURM 22.05): shlex agrees."""
    cfg, paths = prepare_chain(nasty_config(tmp_path, "slurm.partition=gpu part", "slurm.account=a;b"), write=False)
    lines = sbatch_directives(cfg, paths, Step(1, "cache-teacher"))
    words = dict(shlex.split(line)[0].split("=", 1) for line in lines if "=" in line)
    assert words["--output"] == str(paths.slurm / "logs" / "iter_0001-cache-teacher-%A_%a.log")
    assert words["--chdir"] == str(tmp_path / "work dir")
    assert words["--partition"] == "gpu part" and words["--account"] == "a;b"
    assert words["--array"] == "0-1"


def test_a_path_sbatch_cannot_read_is_refused(tmp_path):
    cfg = load_config(None, [])
    cfg.output_dir = str(tmp_path / "back\\slash")
    with pytest.raises(GrpoKdError, match="backslash"):
        render_script(cfg, prepare_chain(cfg, write=False)[1], Step(1, "rollout"))


# ---------------------------------------------------------------------------------------------- the trap


PHASE_75_ON_USR2 = """
    import os, signal, sys, time
    marker = os.path.join(os.environ["FAKE_DIR"], "phase-ready")
    def stop(signum, frame):
        open(os.environ["FAKE_DIR"] + "/phase-got-" + signal.Signals(signum).name, "w").close()
        sys.exit(75)
    signal.signal(signal.SIGUSR2, stop)
    open(marker, "w").close()
    time.sleep(float(os.environ.get("FAKE_PHASE_SECONDS", "30")))
    sys.exit(int(os.environ.get("FAKE_PHASE_EXIT", "0")))
"""
SCONTROL_RECORDS = """
    import os, sys
    open(os.path.join(os.environ["FAKE_DIR"], "scontrol.txt"), "a").write(" ".join(sys.argv[1:]) + "\\n")
"""


def _run_update_script(tmp_path, fake_bin, *, send_usr2: bool, seconds: str, exit_code: str):
    cfg, paths = prepare_chain(nasty_config(tmp_path))
    fake_tool(fake_bin, "srun", PHASE_75_ON_USR2)
    fake_tool(fake_bin, "scontrol", SCONTROL_RECORDS)
    script = tmp_path / "update.sh"
    script.write_text(render_script(cfg, paths, Step(1, "update")))
    env = {**os.environ, "SLURM_JOB_ID": "4242", "FAKE_PHASE_SECONDS": seconds, "FAKE_PHASE_EXIT": exit_code}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "phase-ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if send_usr2:
        proc.send_signal(signal.SIGUSR2)  # what `--signal=B:USR2@N` does: the batch shell only
    out, _ = proc.communicate(timeout=60)
    scontrol = (tmp_path / "scontrol.txt").read_text() if (tmp_path / "scontrol.txt").exists() else ""
    return proc.returncode, out, scontrol


def test_trap_forwards_the_signal_and_requeues_on_exit_75(tmp_path, fake_bin):
    code, out, scontrol = _run_update_script(tmp_path, fake_bin, send_usr2=True, seconds="30", exit_code="0")
    assert (tmp_path / "phase-got-SIGUSR2").exists()
    assert scontrol == "requeue 4242\n"
    assert code == 0 and "requeueing" in out


@pytest.mark.parametrize("exit_code", ["0", "3"])
def test_no_requeue_without_the_signal(tmp_path, fake_bin, exit_code):
    code, _, scontrol = _run_update_script(tmp_path, fake_bin, send_usr2=False, seconds="0", exit_code=exit_code)
    assert code == int(exit_code) and scontrol == ""


# ---------------------------------------------------------------------------------------------- dry run, multi-node


def test_dry_run_prints_scripts_and_order_and_writes_nothing(tmp_path, capsys):
    run_root = tmp_path / "runs"
    code = main(["chain", "submit", "--iterations", "2", f"output_dir={run_root}", "teacher.num_shards=2", "rollout.num_shards=2",
                 "slurm.array_parallelism=1", "slurm.signal_seconds=120", "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("#!/bin/bash") == 6 and out.count("#SBATCH --signal=B:USR2@120") == 6
    assert "#SBATCH --array=0-1%1" in out and "--requeue" in out and "--open-mode=append" in out
    order = [line for line in out.splitlines() if line[:2] in {f"{n}." for n in range(1, 7)}]
    assert [line.split()[1:4] for line in order] == [
        ["iteration", "1", "rollout"], ["iteration", "1", "cache-teacher"], ["iteration", "1", "update"],
        ["iteration", "2", "rollout"], ["iteration", "2", "cache-teacher"], ["iteration", "2", "update"],
    ]  # fmt: skip
    assert "after <iteration 1 cache-teacher>" in order[2]
    assert not run_root.exists()


def test_sft_is_phase_0_of_the_chain_its_script_and_its_status(tmp_path, capsys):
    """With sft.enabled the chain starts with `grpo-kd sft --config RUN/config.yaml --resume` (no iteration), which
    iteration 1's rollout waits for; it may run under torchrun like the update; chain status lists it, done when
    checkpoints/iter_0000 exists."""
    run_root = tmp_path / "runs"
    code = main(["chain", "submit", "--iterations", "1", f"output_dir={run_root}", "sft.enabled=true",
                 "data.prefix_words=8", "--dry-run"])  # phase 0 on the prompts' first 8 words and the rest
    out = capsys.readouterr().out
    order = [line for line in out.splitlines() if line[:2] in {f"{n}." for n in range(1, 5)}]
    assert code == 0 and [line.split()[1:4] for line in order] == [
        ["phase", "0", "sft"], ["iteration", "1", "rollout"], ["iteration", "1", "cache-teacher"],
        ["iteration", "1", "update"],
    ]  # fmt: skip
    assert "after <phase 0 sft>" in order[1] and "iter_0000-sft.sbatch" in order[0]
    assert "/grpo-kd sft --config " in out and "/config.yaml --resume \"$@\"" in out
    cfg = nasty_config(tmp_path, "sft.enabled=true", "data.prefix_words=8", "slurm.sft.nodes=2",
                       "slurm.sft.gpus_per_node=2")
    cfg, paths = prepare_run(cfg, iterations=1)
    text = render_script(cfg, paths, Step(0, "sft"))
    assert "torchrun" in text and "-m grpo_kd.cli.app sft --config" in text and "--iteration" not in text
    rows = chain_status(cfg, paths, jobs=None)
    assert [(r.step.iteration, r.step.phase, r.done) for r in rows][:2] == [(0, "sft", False), (1, "rollout", False)]
    paths.checkpoint(0).mkdir(parents=True)
    assert chain_status(cfg, paths, jobs=None)[0].done


def test_multi_node_update_runs_torchrun_with_a_rendezvous_on_the_first_node(tmp_path):
    cfg = nasty_config(tmp_path, "slurm.update.nodes=2", "slurm.update.gpus_per_node=4",
                       "slurm.setup=['module load cuda']")
    cfg, paths = prepare_chain(cfg, write=False)
    text = render_script(cfg, paths, Step(1, "update"))
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert "srun --ntasks-per-node=1" in text and "torchrun" in text and "--nproc-per-node=4" in text
    assert '--rdzv-backend=c10d --rdzv-endpoint="$head_node:29500"' in text and "-m grpo_kd.cli.app update" in text
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=4" in text
    assert text.index("module load cuda") < text.index("head_node=") < text.index("srun ")
    assert "kill -TERM" in text  # torchrun passes TERM on to its workers; USR2 would kill it


# ---------------------------------------------------------------------------------------------- submit / resume


SBATCH_RECORDS = """
    import os, sys
    d = os.environ["FAKE_DIR"]
    n = int(open(d + "/next_id").read()) if os.path.exists(d + "/next_id") else 100
    open(d + "/next_id", "w").write(str(n + 1))
    open(d + "/sbatch.txt", "a").write(str(n) + " " + " ".join(a for a in sys.argv[1:] if a.startswith("--")) + "\\n")
    print(n)
"""
SCONTROL_FROM_FILE = """
    import os, sys
    path = os.environ["FAKE_DIR"] + "/jobs.txt"
    print(open(path).read() if os.path.exists(path) else "No jobs in the system")
"""
SCANCEL_RECORDS = """
    import os, sys
    open(os.environ["FAKE_DIR"] + "/scancel.txt", "a").write(" ".join(sys.argv[1:]) + "\\n")
"""


def _jobs(fake_dir: Path, lines: list[str]) -> None:
    (fake_dir / "jobs.txt").write_text("\n".join(lines) + "\n")


def test_submit_chains_afterok_and_resume_keeps_queued_jobs(tmp_path, fake_bin, tiny_models_quick):
    for name, body in (("sbatch", SBATCH_RECORDS), ("scontrol", SCONTROL_FROM_FILE), ("scancel", SCANCEL_RECORDS)):
        fake_tool(fake_bin, name, body)
    models = [f"model.path={tiny_models_quick.student}", f"teacher.path={tiny_models_quick.teacher}",
              f"data.prompts={ROOT / 'grpo_kd' / 'assets' / 'builtin_corpus.txt'}"]  # submit checks them first
    cfg, paths = prepare_chain(nasty_config(tmp_path, *models), iterations=1)
    submitted = submit_chain(cfg, paths, echo=lambda line: None)
    assert [s.job_id for s in submitted] == ["100", "101", "102"]
    calls = (tmp_path / "sbatch.txt").read_text().splitlines()
    assert calls[0] == "100 --parsable"
    assert calls[1] == "101 --parsable --dependency=afterok:100 --kill-on-invalid-dep=yes"
    assert calls[2] == "102 --parsable --dependency=afterok:101 --kill-on-invalid-dep=yes"
    assert [r.job_id for r in JobRecord.load_all(paths)] == ["100", "101", "102"]

    _jobs(tmp_path, ["JobId=100 ArrayJobId=100 ArrayTaskId=0 JobState=RUNNING Reason=None",
                     "JobId=101 ArrayJobId=101 ArrayTaskId=0-1 JobState=PENDING Reason=Dependency",
                     "JobId=102 JobState=PENDING Reason=Dependency"])  # fmt: skip
    with pytest.raises(SlurmError, match="still queued or running"):
        submit_chain(cfg, paths, echo=lambda line: None)
    assert submit_chain(cfg, paths, resume=True, echo=lambda line: None)[-1].kept  # nothing new
    assert len((tmp_path / "sbatch.txt").read_text().splitlines()) == 3

    _jobs(tmp_path, ["JobId=100 ArrayJobId=100 ArrayTaskId=1 JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0",
                     "JobId=101 ArrayJobId=101 ArrayTaskId=0-1 JobState=PENDING Reason=Dependency",
                     "JobId=102 JobState=PENDING Reason=Dependency"])  # fmt: skip
    again = submit_chain(cfg, paths, resume=True, echo=lambda line: None)
    assert [s.job_id for s in again] == ["103", "104", "105"] and not any(s.kept for s in again)
    assert (tmp_path / "scancel.txt").read_text().split() == ["101", "102"]


def test_status_names_the_failed_array_task_and_its_log(tmp_path, fake_bin):
    fake_tool(fake_bin, "scontrol", SCONTROL_FROM_FILE)
    cfg, paths = prepare_run(load_config(None, [f"output_dir={tmp_path}", "teacher.num_shards=2", "rollout.num_shards=2"]), iterations=1)
    records = [JobRecord(step.key, 1, step.phase, job_id, 2 if step.phase == "cache-teacher" else 1, "s",
                         str(paths.slurm / "logs" / ("x-%A_%a.log" if step.phase == "cache-teacher" else "x-%j.log")))
               for job_id, step in zip(["10", "11", "13"], chain_steps(cfg))]  # array 11 has job ids 11 and 12
    JobRecord.save_all(paths, records)
    _jobs(tmp_path, [
        "JobId=10 JobName=a b JobState=COMPLETED Reason=None ExitCode=0:0",
        "JobId=12 ArrayJobId=11 ArrayTaskId=1 JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0 Restarts=0",
        "JobId=11 ArrayJobId=11 ArrayTaskId=0 JobState=COMPLETED Reason=None ExitCode=0:0",
        "JobId=13 JobState=CANCELLED Reason=DependencyNeverSatisfied ExitCode=0:0",
    ])  # fmt: skip
    jobs = query_jobs()
    assert jobs["11"][0] == JobTask("1", "FAILED", "NonZeroExitCode", "1:0", 0)
    rows = chain_status(cfg, paths, jobs)
    assert [r.state for r in rows] == ["COMPLETED", "FAILED", "CANCELLED"]
    assert [r.failed for r in rows] == [False, True, False]  # a dependent cancelled by the failure did not fail
    (line,) = describe_failures(rows)
    assert "iteration 1 cache-teacher FAILED" in line and str(paths.slurm / "logs" / "x-11_1.log") in line
