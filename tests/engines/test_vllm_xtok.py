"""A teacher with another tokenizer scored by vLLM (`teacher.engine: vllm`): its prompt log-probs of its own tokens
(chat prompt, completion text, end of turn), aligned onto the student's tokens exactly as on the transformers
path. One engine start: the Llama teacher (byte-level BPE; vLLM's Gemma-3, the multimodal class, needs torchvision,
which the CPU install leaves out); the Mistral-family student's rollouts (SentencePiece-style) come from transformers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grpo_kd.cache.teacher import open_teacher_shards
from grpo_kd.cli.app import main
from grpo_kd.config import load_config
from grpo_kd.paths import RunPaths
from grpo_kd.tiny import BUILTIN_CORPUS

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FLOAT_TOL = 1e-4
ALIGNMENT = ["target_logprobs", "xtok_bytes", "xtok_teacher_tokens", "xtok_straddled"]


def test_vllm_teacher_with_another_tokenizer(tiny_family, vllm_models, needs_vllm, tmp_path):
    from grpo_kd.train.teacher_pass import run_teacher_pass

    student, teacher = tiny_family("mistral").student, vllm_models.teacher
    overrides = [f"output_dir={tmp_path}", "name=v", f"model.path={student}", f"teacher.path={teacher}",
                 "teacher.chat_template=true", "teacher.reference=false", f"data.prompts={BUILTIN_CORPUS}",
                 "data.format=text", "data.prefix_words=4", "rollout.prompts_per_iteration=3",
                 "rollout.group_size=2", "rollout.max_new_tokens=10", "vllm.enforce_eager=true"]
    assert main(["rollout", "--iteration", "1", *overrides]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "cache-teacher", "--iteration", "1", *overrides,
                           "teacher.engine=vllm"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = RunPaths.of(tmp_path / "v")
    assert main(["cache", "verify", str(paths.root)]) == 0

    hf_root = tmp_path / "hf"
    shutil.copytree(paths.rollouts(1), RunPaths.of(hf_root).rollouts(1))
    run_teacher_pass(load_config(None, [*overrides, "name=hf"]), iteration=1, progress=False)
    ours, theirs = open_teacher_shards(paths.teacher(1))[0], open_teacher_shards(RunPaths.of(hf_root).teacher(1))[0]
    assert ours.manifest["params"]["engine"] == "vllm" and ours.manifest["alignment"] == theirs.manifest["alignment"]
    rows = np.arange(ours.reader.num_rows)
    a, b = ours.reader.read(rows, ALIGNMENT), theirs.reader.read(rows, ALIGNMENT)
    for name in ALIGNMENT[1:]:  # the same alignment records, row by row
        assert all(np.array_equal(x, y) for x, y in zip(a[name], b[name])), name
    gap = max(np.abs(x - y).max() for x, y in zip(a["target_logprobs"], b["target_logprobs"]))
    assert gap < FLOAT_TOL
    assert np.allclose(ours.reader.row_values("seq_logprob"), theirs.reader.row_values("seq_logprob"), atol=1e-3)
