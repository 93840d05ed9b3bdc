"""The update phase end to end on tiny models: metrics, checkpoints, idempotence, and the trainer invariants
(micro-batch x accumulation equivalence, killed-and-resumed == uninterrupted, LoRA across iterations)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ..kernels._reference import ref_sparse_kl_per_token
from ._update_helpers import (
    assert_same_weights,
    build_run,
    copy_run,
    final_weights,
    first_step,
    losses,
    make_config,
    write_rollouts,
)
from grpo_kd.config import save_config
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import load_trainer_state, step_checkpoints
from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.signals import REQUEUE_EXIT_CODE
from grpo_kd.train.update import run_update

EPOCHS = "optim.epochs_per_iteration=2"  # 3 steps per epoch -> 6 optimizer steps


@pytest.fixture(scope="module")
def template(tiny_models_quick, tmp_path_factory):
    root = tmp_path_factory.mktemp("update") / "template"
    build_run(make_config(root, tiny_models_quick))
    return root


@pytest.fixture(scope="module")
def baseline(template, tiny_models_quick, tmp_path_factory):
    """The reference run: one process, micro-batch 4 x accumulation 2, 2 epochs, uninterrupted."""
    run = copy_run(template, tmp_path_factory.mktemp("update") / "baseline")
    cfg = make_config(run, tiny_models_quick, EPOCHS)
    run_update(cfg, 1)
    return run, cfg


def test_grpo_end_to_end(baseline):
    run, cfg = baseline
    paths = RunPaths.of(run)
    records = MetricsLog(paths.metrics).read()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records] == [0, 0, 0, 1, 1, 1]
    for key in ("loss", "reward/teacher_loglik", "reward/length", "kl", "clip_fraction", "ratio", "entropy",
                "grad_norm", "lr", "tokens_per_second"):
        assert all(isinstance(r[key], float) for r in records), key
    assert records[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # behaviour log-probs == recomputed ones
    assert records[0]["ref_source"] == "cache"
    final = paths.checkpoint(1)
    for name in ("model/model.safetensors", "model/config.json", "optimizer.safetensors", "optimizer.json",
                 "scheduler.json", "rng.safetensors", "trainer_state.json"):
        assert (final / name).is_file(), name
    state = load_trainer_state(final)
    assert state["finished"] and state["step"] == 6
    assert step_checkpoints(final) == [] and not (paths.iteration(1) / "prepared.safetensors").exists()
    initial = final_weights(run)  # a finished iteration is left alone by a second call
    started = time.perf_counter()
    assert run_update(cfg, 1) == final
    assert time.perf_counter() - started < 1.0
    assert len(MetricsLog(paths.metrics).read()) == 6
    assert_same_weights(initial, final_weights(run), atol=0.0)


@pytest.mark.parametrize("micro,accum", [(8, 1), (2, 4)])
def test_micro_batches_times_accumulation_equal_one_batch(baseline, template, tiny_models_quick, tmp_path, micro, accum):
    base_run, _ = baseline
    run = copy_run(template, tmp_path / "run")
    run_update(make_config(run, tiny_models_quick, EPOCHS, f"optim.micro_batch_size={micro}",
                           f"optim.grad_accum={accum}"), 1)
    assert losses(run) == pytest.approx(losses(base_run), rel=1e-4, abs=1e-6)
    assert_same_weights(final_weights(run), final_weights(base_run))


@pytest.mark.slow  # a subprocess killed mid-update, then resumed
def test_killed_by_sigterm_then_resumed_equals_uninterrupted(baseline, template, tiny_models_quick, tmp_path):
    base_run, _ = baseline
    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, EPOCHS)
    config_file = tmp_path / "config.yaml"
    save_config(cfg, config_file)
    metrics = RunPaths.of(run).metrics
    proc = subprocess.Popen([sys.executable, "-m", "grpo_kd.cli.app", "update", "--config", str(config_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = sigterm_after_first_step(proc, metrics, seconds=120, exit_seconds=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, output
    saved = step_checkpoints(RunPaths.of(run).checkpoint(1))
    assert saved and not RunPaths.of(run).checkpoint(1).exists()
    stopped_at = load_trainer_state(saved[-1])["step"]
    assert 1 <= stopped_at < 6
    run_update(cfg, 1, resume=True)
    assert [r["step"] for r in MetricsLog(metrics).read()] == [1, 2, 3, 4, 5, 6]
    assert losses(run) == pytest.approx(losses(base_run), rel=1e-5, abs=1e-7)
    assert_same_weights(final_weights(run), final_weights(base_run), atol=1e-6)


def test_periodic_step_checkpoints_are_pruned(template, tiny_models_quick, tmp_path):
    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, "checkpoint.save_every_steps=1", "optim.grad_accum=1",
                      "optim.micro_batch_size=4")  # 6 steps of one group each
    run_update(cfg, 1)
    final = RunPaths.of(run).checkpoint(1)
    assert final.is_dir() and step_checkpoints(final) == []
    assert not list(final.parent.glob("*.tmp-*"))


def test_lora_saves_the_adapter_only_and_the_next_iteration_starts_from_it(template, tiny_models_quick, tmp_path):
    run = copy_run(template, tmp_path / "run")
    shutil.copytree(run / "iter_0001", run / "iter_0002")  # the same rollouts and cache as iteration 2
    cfg = make_config(run, tiny_models_quick, "model.lora=true", "model.lora_r=4", "optim.lr=0.01", "iterations=2")
    first = run_update(cfg, 1)
    names = {p.name for p in (first / "model").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    second = run_update(cfg, 2)
    a, b = final_weights(run, 1), final_weights(run, 2)
    assert a.keys() == b.keys()
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)  # iteration 2 trained on from iteration 1's adapter
    lrs = [r["lr"] for r in MetricsLog(RunPaths.of(run).metrics).read()]
    assert len(lrs) == 6 and second.is_dir()


def test_steps_must_take_whole_groups(template, tiny_models_quick, tmp_path):
    from grpo_kd.errors import GrpoKdError

    run = copy_run(template, tmp_path / "run")
    with pytest.raises(GrpoKdError, match="multiple of rollout.group_size=4"):  # a rule of the config: at load
        make_config(run, tiny_models_quick, "optim.micro_batch_size=3", "optim.grad_accum=1")
    cfg = make_config(run, tiny_models_quick, "optim.micro_batch_size=3", "optim.grad_accum=1",
                      "rollout.group_size=3")  # the rule holds, but the rollouts on disk have groups of 4
    with pytest.raises(GrpoKdError, match="groups of \\[4\\] completions but rollout.group_size=3"):
        run_update(cfg, 1)
    assert not RunPaths.of(run).checkpoint(1).exists()


def sigterm_after_first_step(proc: subprocess.Popen, metrics: Path, *, seconds: float, exit_seconds: float) -> str:
    """Send SIGTERM to the update `proc` once it logged an optimizer step (within `seconds`); its output after it
    exits (within `exit_seconds`)."""
    deadline = time.monotonic() + seconds
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, f"no optimizer step within {seconds:.0f} s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=exit_seconds)[0].decode()


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_command(config_file: Path, *args: str) -> list[str]:
    """`grpo-kd update` under torchrun with 2 CPU ranks on gloo."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "grpo_kd.cli.app", "update",
            "--config", str(config_file), *args]


def torchrun_update(config_file: Path, *args: str) -> str:
    """`grpo-kd update` under torchrun with 2 CPU ranks on gloo; returns its output."""
    result = subprocess.run(torchrun_command(config_file, *args), capture_output=True, text=True, timeout=300,
                            env=TORCHRUN_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow  # torchrun, two processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(baseline, template, tiny_models_quick, tmp_path, parallel):
    """torchrun, 2 CPU ranks on gloo, micro-batch 4 x accumulation 1 each == 1 rank, 4 x 2: the same global batch.
    FSDP (FSDP2 fully_shard, each rank holding half of every parameter) saves whole weights in safetensors."""
    base_run, _ = baseline
    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, EPOCHS, "optim.grad_accum=1", f"optim.data_parallel={parallel}")
    config_file = tmp_path / "config.yaml"
    save_config(cfg, config_file)
    torchrun_update(config_file)
    assert load_trainer_state(RunPaths.of(run).checkpoint(1))["parallel"] == {"kind": parallel, "world_size": 2}
    assert losses(run) == pytest.approx(losses(base_run), rel=1e-4, abs=1e-6)
    assert_same_weights(final_weights(run), final_weights(base_run))
    optimizer = RunPaths.of(run).checkpoint(1) / "optimizer.safetensors"
    base_optimizer = RunPaths.of(base_run).checkpoint(1) / "optimizer.safetensors"
    assert_same_weights(load_file(str(optimizer)), load_file(str(base_optimizer)), atol=1e-5)


@pytest.mark.slow  # torchrun, two processes, stopped and resumed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_stopped_by_sigterm_then_resumed_equals_one_process(baseline, template, tiny_models_quick, tmp_path,
                                                                      parallel):
    """What a multi-GPU update job sees: the sbatch script sends TERM to torchrun, torchrun passes it to its
    workers, they agree (all-reduce) on the step to stop after, checkpoint and exit; `--resume` under torchrun
    then restores the sharded (FSDP) or replicated (DDP) weights and optimizer state and ends where one
    uninterrupted process ends."""
    base_run, _ = baseline
    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, EPOCHS, "optim.grad_accum=1", f"optim.data_parallel={parallel}")
    config_file = tmp_path / "config.yaml"
    save_config(cfg, config_file)
    metrics = RunPaths.of(run).metrics
    proc = subprocess.Popen(torchrun_command(config_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=TORCHRUN_ENV)
    output = sigterm_after_first_step(proc, metrics, seconds=240, exit_seconds=180)
    assert proc.returncode != 0, output  # torchrun reports its workers' stop as a failure; the script requeues
    saved = step_checkpoints(RunPaths.of(run).checkpoint(1))
    assert saved, output[-3000:]
    assert 1 <= load_trainer_state(saved[-1])["step"] < 6
    torchrun_update(config_file, "--resume")
    assert [r["step"] for r in MetricsLog(metrics).read()] == [1, 2, 3, 4, 5, 6]
    assert load_trainer_state(RunPaths.of(run).checkpoint(1))["parallel"] == {"kind": parallel, "world_size": 2}
    assert losses(run) == pytest.approx(losses(base_run), rel=1e-4, abs=1e-6)
    assert_same_weights(final_weights(run), final_weights(base_run))


ONE_MICRO = ("optim.micro_batch_size=8", "optim.grad_accum=1")  # 3 steps of 2 groups, one micro-batch each


def test_minillm_with_pretraining_loss(template, tiny_models_quick, tmp_path):
    from grpo_kd.tiny import BUILTIN_CORPUS

    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, *ONE_MICRO, "loss.algorithm=minillm", "loss.pt.weight=1.0",
                      f"data.pretrain_text={BUILTIN_CORPUS}", "loss.pt.seq_len=16", "loss.pt.batch_size=4")
    run_update(cfg, 1)
    records = MetricsLog(RunPaths.of(run).metrics).read()
    assert len(records) == 3
    for key in ("pt_loss", "teacher_kl", "reward/log_ratio", "reward/teacher_loglik", "clip_fraction"):
        assert all(isinstance(r[key], float) for r in records), key
    assert records[0]["pt_loss"] > 0 and records[0]["teacher_kl"] > 0


def test_ppo_with_the_minillm_style_reward_and_pretraining_loss(template, tiny_models_quick, tmp_path):
    """The seed study's fourth algorithm (configs/ppo_minillm_reward.yaml): PPO paying log p_T - log q at every
    token, with L_PT, and the KL to the reference as a per-token reward penalty."""
    from grpo_kd.tiny import BUILTIN_CORPUS

    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, *ONE_MICRO, "loss.algorithm=ppo", "loss.reward.kind=minillm",
                      "loss.ppo.kl_in_reward=true", "loss.pt.weight=1.0", f"data.pretrain_text={BUILTIN_CORPUS}",
                      "loss.pt.seq_len=16", "loss.pt.batch_size=4")
    run_update(cfg, 1)
    records = MetricsLog(RunPaths.of(run).metrics).read()
    assert len(records) == 3
    for key in ("pt_loss", "value_loss", "reward/log_ratio", "reward/kl_penalty", "reward/total", "kl"):
        assert all(isinstance(r[key], float) for r in records), key
    first = records[0]  # the per-token total is the log-ratio plus the KL penalty, averaged over the same tokens
    assert first["reward/total"] == pytest.approx(first["reward/log_ratio"] + first["reward/kl_penalty"], abs=1e-5)
    assert first["pt_loss"] > 0


def test_ppo_saves_its_value_head_beside_the_weights(template, tiny_models_quick, tmp_path):
    from grpo_kd.train.distributed import Dist
    from grpo_kd.train.update_state import StartPoint, load_student_parts

    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models_quick, *ONE_MICRO, "loss.algorithm=ppo")
    final = run_update(cfg, 1)
    assert (final / "model" / "value_head.safetensors").is_file()
    assert all("value_loss" in r for r in MetricsLog(RunPaths.of(run).metrics).read())
    _, head = load_student_parts(cfg, StartPoint(final, "previous"), Dist(), value_head=True)
    assert head.weight.abs().sum() > 0  # trained from its zero start, and loaded back


def test_privileged_self_teacher_from_its_own_cache(tiny_models_quick, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(run, tiny_models_quick, *ONE_MICRO, "loss.algorithm=privileged", "teacher.kind=self_privileged",
                      "teacher.reference=false")
    build_run(cfg, privileged=True)
    run_update(cfg, 1)
    records = MetricsLog(RunPaths.of(run).metrics).read()
    assert len(records) == 3 and records[0]["ref_source"] == "none"
    batch, logits = first_step(cfg)  # step 1's KL: the initial student against the informed self's cached top-k
    mask = batch.completion_mask
    per_token = ref_sparse_kl_per_token(logits[mask], batch.teacher_topk_ids[mask], batch.teacher_topk_logprobs[mask],
                                        "reverse", 0.5, "bucket")
    assert records[0]["teacher_kl"] == pytest.approx(float(per_token.mean()), rel=1e-4)


@pytest.mark.parametrize("current", [True, False])
def test_self_teacher_is_the_current_student_only_with_adapter(tiny_models_quick, tmp_path, current):
    """teacher.adapter=true: iteration 2's cache comes from the checkpoint of iteration 1; false: the initial model."""
    import torch

    from grpo_kd.cache.reader import CacheReader
    from grpo_kd.cache.rollouts import RolloutStore
    from grpo_kd.data import Prompt, render_prompt
    from grpo_kd.models import load_student, load_tokenizer
    from grpo_kd.train.checkpoint import model_dir
    from grpo_kd.train.teacher_pass import run_teacher_pass

    run = tmp_path / "run"
    cfg = make_config(run, tiny_models_quick, *ONE_MICRO, "loss.algorithm=privileged", "teacher.kind=self_privileged",
                      "teacher.reference=false", f"teacher.adapter={str(current).lower()}")
    build_run(cfg, privileged=True)
    run_update(cfg, 1)
    write_rollouts(cfg, 2, privileged=True, seed=1)
    run_teacher_pass(cfg, iteration=2, progress=False)

    paths = RunPaths.of(run)
    store = RolloutStore.open(paths.rollouts(2))
    reader = CacheReader.open(paths.rollouts(2), paths.teacher(2))
    batch = reader.batch(list(range(reader.num_groups)))
    tokenizer = load_tokenizer(cfg.model.path)
    models = {"trained": load_student(cfg.model, checkpoint=str(model_dir(paths.checkpoint(1))), trainable=False),
              "initial": load_student(cfg.model, trainable=False)}
    error = {}
    for name, model in models.items():
        error[name] = 0.0
        for b, row in enumerate(batch.index.tolist()):
            record = store[row]
            text = render_prompt(tokenizer, Prompt(record.prompt_id, record.prompt_text, record.privileged),
                                 privileged_template=cfg.teacher.prompt_template)
            ids = tokenizer(text)["input_ids"] + list(record.completion_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            C = len(record.completion_ids)
            expected = torch.log_softmax(logits[-C - 1 : -1], -1).gather(1, torch.tensor(record.completion_ids)[:, None])
            error[name] = max(error[name], float((batch.teacher_logprobs[b, :C] - expected[:, 0]).abs().max()))
    teacher, other = ("trained", "initial") if current else ("initial", "trained")
    assert error[teacher] < 1e-4, error
    assert error[other] > 1e-3, error  # the two models differ, so the check above can tell them apart
