"""Issue 13, case 2: NaN and absurd values never reach a checkpoint, and the report shows them.

Values are checked where they enter and leave the cache (the teacher's and the student's log-probs on write and
on read, `cache verify`), the loss and the gradient norm at every step, and the weights before a checkpoint.
"""

from __future__ import annotations

import json
import shutil

import pytest

from grpo_kd.errors import GrpoKdError

from .helpers import set_list_value


def _refused_update(cfg, paths, iteration: int = 2) -> str:
    from grpo_kd.train.phases import run_phase

    with pytest.raises(GrpoKdError) as refused:
        run_phase(cfg, "update", iteration, resume=True)
    assert not paths.checkpoint(iteration).exists()
    return str(refused.value)


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (1e30, "1e+30")])
def test_a_teacher_shard_holding_nan_or_1e30_is_not_trained_on(damaged_copy, value, shown):
    cfg, paths = damaged_copy
    shutil.rmtree(paths.checkpoint(2))
    set_list_value(paths.teacher(2) / "part-00000.arrow", "target_logprobs", value)  # checksum updated
    message = _refused_update(cfg, paths)
    assert "target_logprobs" in message and shown in message and "rebuild it: grpo-kd cache-teacher" in message


def test_a_student_with_nan_weights_writes_no_rollouts(damaged_copy):
    """The update of iteration 1 wrote NaN weights (as the code before the fix did): the next rollout refuses."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from grpo_kd.train.phases import run_phase

    cfg, paths = damaged_copy
    shutil.rmtree(paths.checkpoint(2))
    shutil.rmtree(paths.iteration(2))
    model = paths.checkpoint(1) / "model" / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(model)).items()}, str(model),
              metadata={"format": "pt"})
    sums = paths.checkpoint(1) / "checksums.json"
    if sums.is_file():  # the checkpoint's own list agrees: the NaN came from the trainer, not from the disk
        data = json.loads(sums.read_text())
        data["sha256"]["model/model.safetensors"] = hashlib.sha256(model.read_bytes()).hexdigest()
        sums.write_text(json.dumps(data))
    with pytest.raises(GrpoKdError) as refused:
        run_phase(cfg, "rollout", 2)
    assert "old_logprobs" in str(refused.value) and "nan" in str(refused.value)
    assert not (paths.rollouts(2) / "part-00000.arrow").exists()


def test_cache_verify_finds_nan_rollout_log_probs(damaged_copy):
    from grpo_kd.cache.manifest import read_json, shard_manifest_path
    from grpo_kd.cache.verify import verify_run

    _, paths = damaged_copy
    set_list_value(paths.rollouts(2) / "part-00000.arrow", "old_logprobs", float("nan"))
    teacher = shard_manifest_path(paths.teacher(2), 0)  # it records the rollouts it scored: follow them
    data = read_json(teacher)
    data["rollouts"]["sha256"] = read_json(shard_manifest_path(paths.rollouts(2), 0))["sha256"]
    teacher.write_text(json.dumps(data))
    report = verify_run(paths.root, 2)
    assert not report.ok
    assert any("old_logprobs" in why and "nan" in why for _, why in report.problems), report.lines()


def _rollout_and_teacher(cfg) -> None:
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.train.phases import run_phase

    prepare_run(cfg)
    run_phase(cfg, "rollout", 1)
    run_phase(cfg, "cache-teacher", 1)


def test_a_learning_rate_that_diverges_stops_the_update_without_a_checkpoint(fault_config):
    from grpo_kd.paths import RunPaths
    from grpo_kd.train.phases import run_phase

    cfg = fault_config(**{"optim.lr": 1e6})
    _rollout_and_teacher(cfg)
    paths = RunPaths.of(cfg.run_dir)
    with pytest.raises(GrpoKdError) as stopped:
        run_phase(cfg, "update", 1)
    message = str(stopped.value)
    assert "stopped at step" in message and ("nan" in message or "inf" in message), message
    assert not paths.checkpoint(1).exists()


def test_skipped_steps_are_counted_and_take_no_optimizer_step(fault_config):
    """optim.nonfinite=skip: a step whose loss is NaN takes no optimizer step and says so in the metrics; the
    checkpoint holds the weights of the last finite step."""
    from grpo_kd.paths import RunPaths
    from grpo_kd.train.phases import run_phase

    from .helpers import weights

    cfg = fault_config(**{"optim.lr": 1e6, "optim.nonfinite": "skip"})
    _rollout_and_teacher(cfg)
    paths = RunPaths.of(cfg.run_dir)
    run_phase(cfg, "update", 1)
    rows = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    skipped = [row for row in rows if row.get("skipped")]
    assert len(rows) == 4 and skipped and all(row["nonfinite"].startswith("the ") for row in skipped)
    assert all(bool(value.isfinite().all()) for value in weights(paths.checkpoint(1)).values())


def test_weights_that_are_not_finite_are_never_checkpointed(fault_config):
    """Weights that went bad inside a step (here set to inf by hand) stop the save with one line."""
    import torch

    from grpo_kd.paths import RunPaths
    from grpo_kd.train.distributed import init_distributed
    from grpo_kd.train.update import _setup
    from grpo_kd.train.update_state import save_state

    cfg = fault_config()
    _rollout_and_teacher(cfg)
    paths = RunPaths.of(cfg.run_dir)
    run = _setup(cfg, 1, False, paths, init_distributed(cfg.model.device))
    with torch.no_grad():
        next(run.train_module.parameters())[0, 0] = float("inf")
    with pytest.raises(GrpoKdError) as refused:
        save_state(run, 4, None, step=False)
    assert "weights hold NaN or inf" in str(refused.value)
    assert not paths.checkpoint(1).exists()


def test_report_counts_nonfinite_steps_and_shows_the_last_loss_as_it_is(tmp_path, capsys):
    from grpo_kd.cli.app import main

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    rows = [{"iteration": 1, "step": 1, "epoch": 0, "loss": 0.02071, "grad_norm": 0.5}]
    rows += [{"iteration": 1, "step": s, "epoch": 0, "loss": "nan", "grad_norm": "nan"} for s in range(2, 33)]
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0
    report = (run / "reports" / "report.md").read_text()
    assert "31 non-finite step(s)" in report and "first: iteration 1 step 2" in report
    assert "last loss nan" in capsys.readouterr().out
