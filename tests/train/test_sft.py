"""Phase 0 (SFT) on the tiny pair: it lowers held-out NLL, `grpo-kd run` runs it before iteration 1 and iteration 1
starts from its checkpoint, a second run does nothing, and a killed SFT resumed equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ._update_helpers import assert_same_weights, final_weights
from .test_update import sigterm_after_first_step
from grpo_kd.config import load_config, save_config
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import load_trainer_state, step_checkpoints
from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.signals import REQUEUE_EXIT_CODE
from grpo_kd.train.sft import run_sft


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Training and held-out sentences of the built-in corpus (different lines), as text files."""
    from grpo_kd.tiny import BUILTIN_CORPUS, corpus_texts

    lines = [t for t in corpus_texts([BUILTIN_CORPUS]) if len(t.split(" ")) > 4]
    root = tmp_path_factory.mktemp("sft-data")
    (root / "train.txt").write_text("\n".join(lines[0:600:3]) + "\n", encoding="utf-8")  # 200 sentences
    (root / "heldout.txt").write_text("\n".join(lines[1:600:6]) + "\n", encoding="utf-8")  # 100 others
    return root


def config(run, models, texts, *extra):
    """SFT on 128 prompt + continuation pairs (first 3 words, the rest), 8 steps of 16 per epoch; one GRPO
    iteration of 8 prompts x 4 after it."""
    return load_config(None, [
        f"name={run.name}", f"output_dir={run.parent}", f"model.path={models.student}", f"teacher.path={models.teacher}",
        f"data.prompts={texts / 'train.txt'}", "data.format=text", "data.prefix_words=3", "data.heldout_fraction=0",
        "sft.enabled=true", "sft.max_examples=128", "optim.micro_batch_size=16", "optim.lr=0.003", "seed=1",
        "rollout.prompts_per_iteration=8", "rollout.group_size=4", "rollout.max_new_tokens=8", "teacher.top_k=8",
        "tracking.tensorboard=false", *extra,
    ])  # fmt: skip


def heldout_nll(model_dir, tokenizer_dir, texts) -> float:
    from grpo_kd.evaluate.perplexity import perplexity
    from grpo_kd.models import load_causal_lm, load_tokenizer

    lines = (texts / "heldout.txt").read_text(encoding="utf-8").splitlines()
    return perplexity(load_causal_lm(str(model_dir)), load_tokenizer(str(tokenizer_dir)), lines)["nll_per_token"]


def test_sft_lowers_held_out_nll(tiny_models, texts, tmp_path):
    cfg = config(tmp_path / "run", tiny_models, texts, "sft.epochs=2")
    final = run_sft(cfg)
    assert final == RunPaths.of(cfg.run_dir).checkpoint(0) and load_trainer_state(final)["algorithm"] == "sft"
    records = MetricsLog(RunPaths.of(cfg.run_dir).metrics).read()
    assert [r["step"] for r in records] == list(range(1, 17)) and {r["iteration"] for r in records} == {0}
    before = heldout_nll(tiny_models.student, tiny_models.tokenizer, texts)
    after = heldout_nll(final / "model", tiny_models.tokenizer, texts)
    assert after < before - 0.1, (before, after)


def test_run_does_phase_0_then_iteration_1_from_its_checkpoint_and_a_rerun_nothing(tiny_models, texts, tmp_path):
    from grpo_kd.cli.app import main
    from grpo_kd.train.policy import collate, completion_logprobs
    from grpo_kd.cache.rollouts import RolloutStore
    from grpo_kd.models import load_causal_lm

    run = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    save_config(config(run, tiny_models, texts, "sft.max_steps=4", "iterations=1"), config_file)
    assert main(["run", "--config", str(config_file), "--in-process"]) == 0
    paths = RunPaths.of(run)
    sft_model = paths.checkpoint(0) / "model"
    assert sft_model.is_dir() and paths.checkpoint(1).is_dir()
    records = MetricsLog(paths.metrics).read()
    assert [(r["iteration"], r["step"]) for r in records][:5] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1)]
    # iteration 1 sampled from the SFT checkpoint: its behaviour log-probs are that model's, not the initial one's
    store = RolloutStore.open(paths.rollouts(1))
    rows = [store.shards[0].record(i) for i in range(4)]
    batch = collate([r.prompt_ids for r in rows], [r.completion_ids for r in rows])
    recorded = torch.zeros_like(batch.completion_mask)
    for b, r in enumerate(rows):
        recorded[b, : len(r.old_logprobs)] = torch.tensor(r.old_logprobs)
    with torch.no_grad():
        for model, same in ((sft_model, True), (tiny_models.student, False)):
            logprobs, _ = completion_logprobs(load_causal_lm(str(model)), batch)
            assert torch.allclose(logprobs, recorded, atol=1e-4) == same, model
    assert abs(records[4]["ratio"] - 1.0) < 1e-4  # and the update started from it: step 1's ratio is 1
    # idempotent: every phase is done before, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (paths.checkpoint(0), paths.checkpoint(1), paths.metrics)}
    assert main(["run", "--config", str(config_file), "--in-process"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert run_sft(load_config(config_file)) == paths.checkpoint(0)


def test_sft_needs_to_be_enabled(tiny_models, texts, tmp_path, capsys):
    """`grpo-kd sft` on a config without sft.enabled: one line (iteration 1 would start from a phase the config
    says is not there); and with it enabled, iteration 1 refuses to start before phase 0 is done."""
    from grpo_kd.cli.app import main
    from grpo_kd.errors import GrpoKdError
    from grpo_kd.train.phases import run_phase

    config_file = tmp_path / "config.yaml"
    save_config(config(tmp_path / "run", tiny_models, texts, "sft.enabled=false"), config_file)
    assert main(["sft", "--config", str(config_file)]) == 1
    assert "sft.enabled is false" in capsys.readouterr().err
    with pytest.raises(GrpoKdError, match="iteration 1 starts from phase 0's checkpoint"):
        run_phase(config(tmp_path / "run", tiny_models, texts), "rollout", 1)


@pytest.mark.slow  # a subprocess killed mid-SFT, then resumed
def test_sft_killed_by_sigterm_then_resumed_equals_uninterrupted(tiny_models, texts, tmp_path):
    base = config(tmp_path / "base", tiny_models, texts)
    run_sft(base)
    cfg = config(tmp_path / "run", tiny_models, texts)
    config_file = tmp_path / "config.yaml"
    save_config(cfg, config_file)
    metrics = RunPaths.of(cfg.run_dir).metrics
    proc = subprocess.Popen([sys.executable, "-m", "grpo_kd.cli.app", "sft", "--config", str(config_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = sigterm_after_first_step(proc, metrics, seconds=120, exit_seconds=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, output
    saved = step_checkpoints(RunPaths.of(cfg.run_dir).checkpoint(0))
    assert saved and 1 <= load_trainer_state(saved[-1])["step"] < 8
    run_sft(cfg, resume=True)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    base_lines = MetricsLog(RunPaths.of(base.run_dir).metrics).read()
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert [r["loss"] for r in lines] == pytest.approx([r["loss"] for r in base_lines], rel=1e-5, abs=1e-7)
    assert_same_weights(final_weights(cfg.run_dir, 0), final_weights(base.run_dir, 0), atol=1e-6)
