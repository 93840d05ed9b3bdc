"""Checkpoints: exact restore of optimizer, scheduler and RNG state, atomic directories, no pickles."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_kd.errors import GrpoKdError
from grpo_kd.train.checkpoint import (
    load_trainer_state,
    model_dir,
    prune_step_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    step_checkpoint,
    step_checkpoints,
)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _train_steps(model, optimizer, scheduler, steps):
    for _ in range(steps):
        ids = torch.randint(0, 61, (2, 7))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return float(loss.detach())


def _setup(seed=0):
    model = _tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def test_resumed_training_equals_uninterrupted(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_steps(model, optimizer, scheduler, 3)
    save_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, scheduler=scheduler,
                    state={"step": 3, "data_position": 6})
    random.random()
    expected = [_train_steps(model, optimizer, scheduler, 1) for _ in range(2)]

    fresh = LlamaForCausalLM.from_pretrained(model_dir(tmp_path / "ck"))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (1 + s))
    torch.manual_seed(1234)  # scrambled; the checkpoint's RNG state must win
    state = restore_checkpoint(tmp_path / "ck", optimizer=fresh_opt, scheduler=fresh_sched)
    assert state["step"] == 3 and state["data_position"] == 6
    resumed = [_train_steps(fresh, fresh_opt, fresh_sched, 1) for _ in range(2)]
    assert resumed == expected
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_holds_no_pickles(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_steps(model, optimizer, scheduler, 1)
    save_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 1})
    suffixes = {p.suffix for p in (tmp_path / "ck").rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json"}, suffixes


def test_existing_checkpoint_is_never_rewritten_and_temporaries_are_pruned(tmp_path):
    model, optimizer, scheduler = _setup()
    final = tmp_path / "iter_0001"
    for step in (2, 4, 6):
        save_checkpoint(step_checkpoint(final, step), model=model, state={"step": step})
    before = (step_checkpoint(final, 6) / "trainer_state.json").stat().st_mtime_ns
    save_checkpoint(step_checkpoint(final, 6), model=model, state={"step": 999})
    assert load_trainer_state(step_checkpoint(final, 6))["step"] == 6
    assert (step_checkpoint(final, 6) / "trainer_state.json").stat().st_mtime_ns == before
    (tmp_path / "iter_0001.step-0000008.tmp-99").mkdir()  # a killed save
    assert [p.name for p in step_checkpoints(final)] == [f"iter_0001.step-000000{s}" for s in (2, 4, 6)]
    prune_step_checkpoints(final, keep_last=1)
    assert [p.name for p in step_checkpoints(final)] == ["iter_0001.step-0000006"]
    assert not (tmp_path / "iter_0001.step-0000008.tmp-99").exists()


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(GrpoKdError, match="not a complete checkpoint"):
        load_trainer_state(tmp_path / "half")
