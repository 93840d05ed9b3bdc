"""benchmarks/bench_trl.py's grpo-kd side is configured as its TRL side: the same prompts (the JSONL rows'
`prompt`, whole), the same sampling and optimizer settings, and the peer's loss (GRPO, or the token-level
reverse KL to a live teacher for `--peer distillation`)."""

import json
from pathlib import Path

import pytest

from grpo_kd.data import prompts_from_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_trl(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_trl

    return bench_trl


@pytest.mark.parametrize("peer", ["grpo", "distillation"])
def test_grpokd_side_matches_trl_settings(bench_trl, tmp_path, peer):
    prompts = ["Vit telja: tíggju, ellivu,", "Ein lítil prompt", "Tríggjar"]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}, ensure_ascii=False) + "\n"
                                    for i, p in enumerate(prompts)), encoding="utf-8")
    s = bench_trl.Settings(prompts=3, group_size=4, max_new_tokens=7, micro_batch=4, lr=3e-3, temperature=0.7,
                           models=str(tmp_path / "models"), prompts_file=str(prompts_file), workdir=str(tmp_path),
                           peer=peer)
    cfg = bench_trl.grpokd_config(s, tmp_path / "runs" / "run", iterations=2)

    assert [p.text for p in prompts_from_config(cfg.data)] == prompts  # what TRL's dataset holds
    assert (cfg.rollout.prompts_per_iteration, cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (3, 4, 7)
    assert (cfg.rollout.temperature, cfg.optim.lr, cfg.optim.micro_batch_size, cfg.iterations) == (0.7, 3e-3, 4, 2)
    assert (cfg.optim.lr_schedule, cfg.optim.epochs_per_iteration, cfg.optim.grad_accum) == ("constant", 1, 1)
    assert cfg.model.dtype == cfg.teacher.dtype == "float32" and cfg.teacher.kind == "model"
    if peer == "distillation":
        assert cfg.loss.algorithm == "privileged" and cfg.loss.teacher_kl.divergence == "reverse"
        assert cfg.loss.teacher_kl.tail == "bucket" and cfg.teacher.reference is False
    else:
        assert cfg.loss.algorithm == "grpo" and cfg.loss.reward.kind == "teacher_loglik"
