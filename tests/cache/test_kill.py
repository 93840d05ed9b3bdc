"""SIGKILL `grpo-kd cache-teacher` (a real subprocess) at random moments, then let it finish: the final cache is
byte-identical to an uninterrupted run's, nothing unfinished ever looks finished, and `cache verify` passes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from grpo_kd.cache.manifest import list_shard_manifests, remove_shard, shard_is_complete, tmp_leftovers
from grpo_kd.cli.app import main
from grpo_kd.fsutil import sha256_file
from grpo_kd.paths import RunPaths

from .cache_helpers import make_run

KILLS = 10


def cache_teacher(config, run_name, root) -> list[str]:
    return [sys.executable, "-m", "grpo_kd.cli.app", "cache-teacher", "--config", str(config),
            f"output_dir={root}", f"name={run_name}"]


def shard_hashes(teacher_dir):
    return {p.name: sha256_file(p) for p in sorted(teacher_dir.glob("part-*.arrow"))}


def kill_once_kept(command: list[str], kept_files, count: int, poll_s: float) -> list[Path]:
    """Run `command` and SIGKILL it as soon as `kept_files()` lists `count` files; returns what it lists then."""
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(kept_files()) < count:
        assert proc.poll() is None, "cache-teacher finished before it could be killed: lower the token budget"
        assert time.monotonic() < deadline
        time.sleep(poll_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kept_files()


def cut_short(path: Path) -> None:
    """As if a crash had cut the file short."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun(tmp_path, cache_models):
    config, clean_run = make_run(tmp_path, cache_models, name="clean", num_prompts=8, group_size=4,
                                 max_new_tokens=16, num_shards=3, teacher={"token_budget": 48})
    killed_run = tmp_path / "killed"
    shutil.copytree(RunPaths.of(clean_run).rollouts(1), RunPaths.of(killed_run).rollouts(1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    started = time.perf_counter()
    subprocess.run(cache_teacher(config, "clean", tmp_path), check=True, env=env, capture_output=True)
    full_seconds = time.perf_counter() - started
    expected = shard_hashes(RunPaths.of(clean_run).teacher(1))
    assert len(expected) == 3

    teacher_dir = RunPaths.of(killed_run).teacher(1)
    rng = random.Random(1234)
    mid_write = 0
    for attempt in range(KILLS):
        finished = sorted(list_shard_manifests(teacher_dir))
        if len(finished) == len(expected):  # keep work to interrupt: forget one finished shard
            remove_shard(teacher_dir, rng.choice(finished))
        proc = subprocess.Popen(cache_teacher(config, "killed", tmp_path), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:  # anywhere in the run: start-up, model loading, reference pass, writing
            time.sleep(rng.uniform(0.1, 1.0) * full_seconds)
        else:  # once the teacher has begun a shard, after a random share of a second
            while proc.poll() is None and not tmp_leftovers(teacher_dir):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write += bool(tmp_leftovers(teacher_dir))
        for shard in list_shard_manifests(teacher_dir):  # whatever has a manifest is whole
            assert shard_is_complete(teacher_dir, shard, "arrow", verify_checksum=True)
    assert mid_write >= 1, "no kill landed while a shard was being written"
    subprocess.run(cache_teacher(config, "killed", tmp_path), check=True, env=env, capture_output=True)

    assert shard_hashes(teacher_dir) == expected
    assert main(["cache", "verify", str(killed_run)]) == 0
    print(f"{KILLS} kills, {mid_write} of them left a half-written shard; full run {full_seconds:.1f} s")


@pytest.mark.slow  # a cache-teacher subprocess killed mid-shard
def test_killed_shard_resumes_from_its_kept_batches(tmp_path, cache_models, capsys):
    """A kill mid-shard keeps the reference log-probs and the teacher batches already scored: the next run scores
    only the rest (a batch file cut short by the crash is dropped and scored again), and the shard is
    byte-identical to a clean run's, teacher samples and reference log-probs included."""
    from grpo_kd.cache.progress import kept_batch_files, progress_dir
    from grpo_kd.config import load_config
    from grpo_kd.train.teacher_pass import run_teacher_pass

    teacher = {"token_budget": 40, "num_samples": 3}
    config, clean_run = make_run(tmp_path, cache_models, name="clean", num_prompts=8, group_size=4,
                                 max_new_tokens=16, num_shards=1, teacher=teacher)
    clean = run_teacher_pass(load_config(config, []), iteration=1, progress=False)
    expected = shard_hashes(RunPaths.of(clean_run).teacher(1))
    total = int(sum(m["tokens"] for m in list_shard_manifests(RunPaths.of(clean_run).teacher(1)).values()))
    assert clean.shards_done == [0] and clean.tokens == clean.reference_tokens == total

    killed_run = tmp_path / "killed"
    shutil.copytree(RunPaths.of(clean_run).rollouts(1), RunPaths.of(killed_run).rollouts(1))
    teacher_dir = RunPaths.of(killed_run).teacher(1)
    kept_dir = progress_dir(teacher_dir, 0)
    kept = kill_once_kept(cache_teacher(config, "killed", tmp_path), lambda: kept_batch_files(teacher_dir, 0), 3,
                          poll_s=0.002)
    assert not list_shard_manifests(teacher_dir)
    kept_tokens = [int(np.load(p)["num_tokens"].sum()) for p in kept]
    capsys.readouterr()
    assert main(["cache", "verify", str(killed_run)]) == 1
    assert f"{len(kept)} scored batches (and " in capsys.readouterr().out
    cut_short(kept[-1])

    result = run_teacher_pass(load_config(config, [f"output_dir={tmp_path}", "name=killed"]), iteration=1,
                              progress=False)
    assert result.shards_done == [0]
    assert result.tokens == total - sum(kept_tokens[:-1]) < total
    assert result.reference_tokens == 0  # the reference pass had finished before the kill: kept too
    assert shard_hashes(teacher_dir) == expected
    assert not kept_dir.exists()
    assert main(["cache", "verify", str(killed_run)]) == 0


@pytest.mark.slow  # a cache-teacher subprocess killed mid-pass
def test_kill_during_the_reference_pass_keeps_its_scored_batches(tmp_path, cache_models):
    """The reference pass keeps each batch too: a run killed during it scores only the reference batches not kept
    (a file cut short is scored again), and the shard is byte-identical to a clean run's."""
    from grpo_kd.cache.progress import kept_batch_files, kept_reference_files
    from grpo_kd.config import load_config
    from grpo_kd.train.teacher_pass import run_teacher_pass

    teacher = {"token_budget": 40}
    config, clean_run = make_run(tmp_path, cache_models, name="clean", num_prompts=8, group_size=4,
                                 max_new_tokens=16, num_shards=1, teacher=teacher)
    clean = run_teacher_pass(load_config(config, []), iteration=1, progress=False)
    expected = shard_hashes(RunPaths.of(clean_run).teacher(1))

    killed_run = tmp_path / "killed"
    shutil.copytree(RunPaths.of(clean_run).rollouts(1), RunPaths.of(killed_run).rollouts(1))
    teacher_dir = RunPaths.of(killed_run).teacher(1)
    kept = kill_once_kept(cache_teacher(config, "killed", tmp_path), lambda: kept_reference_files(teacher_dir, 0), 2,
                          poll_s=0.001)
    kept_tokens = [len(np.load(p)["values"]) for p in kept]
    cut_short(kept[-1])
    teacher_kept = sum(int(np.load(p)["num_tokens"].sum()) for p in kept_batch_files(teacher_dir, 0))  # usually 0

    result = run_teacher_pass(load_config(config, [f"output_dir={tmp_path}", "name=killed"]), iteration=1,
                              progress=False)
    assert result.reference_tokens == clean.reference_tokens - sum(kept_tokens[:-1])
    assert result.reference_tokens < clean.reference_tokens
    assert result.tokens == clean.tokens - teacher_kept
    assert shard_hashes(teacher_dir) == expected
    assert not kept_reference_files(teacher_dir, 0)  # cleared with the finished shard
