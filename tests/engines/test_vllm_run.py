"""`grpo-kd run` with vLLM for the rollout and the teacher pass, checked against the transformers path.

One run (one iteration, 3 engine starts: rollout, reference, teacher) carries most checks, because an engine
start is the cost of a vLLM test on a CPU. Tolerance of the cache against the transformers path on the same
rollouts (float32 weights on a CPU): float32 fields within 1e-4, top-k log-probs within one step of their
storage dtype (float16) plus 1e-4, top-k ids equal except where two neighbours are within 1e-4 (a near-tie
that either engine may order its own way).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cache.spec import stored_logprobs_as_float32
from grpo_kd.cache.teacher import open_teacher_shards
from grpo_kd.config import load_config
from grpo_kd.paths import RunPaths

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FLOAT_TOL = 1e-4


def _write_prompts(path):
    lines = ["Hvat er klokkan", "The colour of the sea", "Í gjár fór eg", "A small boat came",
             "Hon sigur at", "We walked along the", "Tað regnar nú", "Every morning the"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _overrides(models, prompts, root, name):
    values = {
        "name": name, "output_dir": str(root), "iterations": 1, "seed": 1,
        "model.path": str(models.student), "teacher.path": str(models.teacher), "teacher.top_k": 8,
        "data.prompts": str(prompts), "data.format": "text", "data.heldout_fraction": 0.0,
        "data.heldout_prompts": str(prompts),
        "rollout.prompts_per_iteration": 4, "rollout.group_size": 3, "rollout.max_new_tokens": 12,
        "rollout.temperature": 0.9, "rollout.engine": "vllm", "teacher.engine": "vllm",
        "loss.policy.tis_cap": 2.0, "loss.policy.beta": 0.02, "optim.micro_batch_size": 12, "vllm.enforce_eager": True,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def _grpo_kd(*args, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _flat(reader, names):
    rows = np.arange(reader.num_rows)
    values = reader.read(rows, names)
    return {name: np.concatenate(values[name]) for name in names}


def test_run_with_vllm_engines_trains_and_caches_what_transformers_caches(vllm_models, needs_vllm, tmp_path):
    from grpo_kd.train.teacher_pass import run_teacher_pass

    prompts = _write_prompts(tmp_path / "prompts.txt")
    overrides = _overrides(vllm_models, prompts, tmp_path / "runs", "v")
    done = _grpo_kd("run", "--in-process", *overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = RunPaths.of(tmp_path / "runs" / "v")
    assert paths.checkpoint(1).is_dir()

    # the rollout shard: vLLM's tokens, the trainer's log-probs beside vLLM's, and their mismatch reported
    manifest = json.loads((paths.rollouts(1) / "part-00000.manifest.json").read_text())
    meta = manifest["meta"]
    assert meta["engine"]["name"] == "vllm" and meta["sampling"]["engine"] == "vllm"
    drift = meta["logprob_drift"]
    assert 0 <= drift["mean_abs"] <= drift["max_abs"] < FLOAT_TOL  # float32 on a CPU: rounding only
    assert "|sampler - trainer log-prob| mean" in done.stdout + done.stderr  # the phase's summary line
    store = RolloutStore.open(paths.rollouts(1))
    assert len(store) == 12 and manifest["sampler_logprobs"]
    eos = 2  # the tiny tokenizer's </s>
    for record in store:
        assert len(record.sampler_logprobs) == len(record.completion_ids) == len(record.old_logprobs)
        assert np.abs(np.subtract(record.sampler_logprobs, record.old_logprobs)).max() <= drift["max_abs"]
        ends_in_eos = record.completion_ids[-1] == eos
        assert ends_in_eos == (record.finish_reason == "stop")
        assert record.finish_reason == "stop" or len(record.completion_ids) == 12

    # the update trained from those shards, with the truncated importance weights
    steps = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert steps and all(abs(s["tis_weight"] - 1.0) < 1e-3 for s in steps)  # no mismatch: weights 1

    # cache verify, then the transformers teacher pass on the very same rollouts: the same cache
    verified = _grpo_kd("cache", "verify", str(paths.root), timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    hf_root = tmp_path / "runs" / "hf"
    shutil.copytree(paths.rollouts(1), RunPaths.of(hf_root).rollouts(1))
    hf_cfg = load_config(None, _overrides(vllm_models, prompts, tmp_path / "runs", "hf") + ["teacher.engine=hf"])
    run_teacher_pass(hf_cfg, iteration=1, progress=False)
    ours = open_teacher_shards(paths.teacher(1))[0]
    theirs = open_teacher_shards(RunPaths.of(hf_root).teacher(1))[0]
    assert ours.manifest["params"]["engine"] == "vllm" and theirs.manifest["params"]["engine"] == "hf"
    names = ["topk_ids", "topk_logprobs", "target_logprobs", "ref_logprobs"]
    a, b = _flat(ours.reader, names), _flat(theirs.reader, names)
    for name in ("target_logprobs", "ref_logprobs"):
        assert np.abs(a[name] - b[name]).max() < FLOAT_TOL, name
    a_top, b_top = stored_logprobs_as_float32(a["topk_logprobs"]), stored_logprobs_as_float32(b["topk_logprobs"])
    step = np.spacing(np.abs(b_top).astype(np.float16)).astype(np.float32)
    assert (np.abs(a_top - b_top) <= step + FLOAT_TOL).all()
    differ = a["topk_ids"] != b["topk_ids"]
    near_tie = np.zeros_like(differ)
    gaps = np.abs(np.diff(b_top, axis=1)) < FLOAT_TOL + step[:, 1:]
    near_tie[:, 1:] |= gaps
    near_tie[:, :-1] |= gaps
    assert not (differ & ~near_tie).any()
    assert np.allclose(ours.reader.row_values("seq_logprob"), theirs.reader.row_values("seq_logprob"), atol=1e-3)
