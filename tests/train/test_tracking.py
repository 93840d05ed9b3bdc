"""Experiment tracking: the TensorBoard event files a run's phases write, read back with TensorBoard's own reader;
the Weights & Biases offline run, read back from its record file; the one step axis across iterations."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ._update_helpers import make_config, write_rollouts
from grpo_kd.config import TrackingConfig, load_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.paths import RunPaths
from grpo_kd.train import tracking
from grpo_kd.train.metrics import MetricsLog, iteration_offsets
from grpo_kd.train.phases import run_phase
from grpo_kd.train.tracking import Tracker, wandb_run_id


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file under `logdir`, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_iteration_offsets_number_steps_across_iterations():
    rows = [{"iteration": 2, "step": s} for s in (1, 2)] + [{"iteration": 1, "step": s} for s in (1, 2, 3, 2)]
    assert iteration_offsets(rows) == {1: 0, 2: 3, 3: 5}
    assert iteration_offsets([]) == {1: 0}


def test_metrics_reach_tensorboard_on_one_axis_and_a_resume_hides_dropped_steps(tmp_path):
    metrics = RunPaths.of(tmp_path).metrics

    def log_steps(iteration, steps, scale):
        log = MetricsLog(metrics, tracker=Tracker(TrackingConfig(), tmp_path))
        log.truncate_after(iteration, steps[0] - 1)
        for step in steps:
            log.log({"iteration": iteration, "step": step, "loss": scale * step, "time": {"io": 1.0}, "src": "cache"})
        log.close()

    log_steps(1, [1, 2, 3], 1.0)
    log_steps(2, [1, 2, 3], 10.0)  # killed after step 3 of iteration 2 ...
    log_steps(2, [2, 3, 4], 100.0)  # ... and resumed from its checkpoint at step 1
    scalars = read_scalars(tmp_path / "logs" / "tensorboard")
    assert scalars["update/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 10.0), (5, 200.0), (6, 300.0), (7, 400.0)]
    assert set(scalars) == {"update/loss", "update/time/io"}  # no position keys, no strings
    assert [(r["iteration"], r["step"]) for r in MetricsLog(metrics).read()][3:] == [(2, 1), (2, 2), (2, 3), (2, 4)]


def test_tracking_off_writes_nothing(tmp_path):
    assert Tracker.for_run(load_config(None, ["tracking.tensorboard=false", f"output_dir={tmp_path}"])) is None
    log = MetricsLog(RunPaths.of(tmp_path / "run").metrics)
    log.log({"iteration": 1, "step": 1, "loss": 1.0})
    assert not (tmp_path / "run" / "logs" / "tensorboard").exists()


def test_a_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(GrpoKdError, match=r"pip install 'grpo-kd\[wandb\]'"):
        Tracker(TrackingConfig(wandb=True), tmp_path)


@pytest.mark.slow  # a real teacher pass and update on the tiny pair
def test_phases_write_their_numbers_as_tensorboard_events(tiny_models_quick, tmp_path):
    cfg = make_config(tmp_path / "run", tiny_models_quick)
    write_rollouts(cfg, 1)
    run_phase(cfg, "cache-teacher", 1, show_progress=False)
    run_phase(cfg, "update", 1, show_progress=False)
    scalars = read_scalars(cfg.run_dir / "logs" / "tensorboard")
    steps = [r["step"] for r in MetricsLog(RunPaths.of(cfg.run_dir).metrics).read()]
    assert [s for s, _ in scalars["update/loss"]] == steps == [1, 2, 3]
    assert [s for s, _ in scalars["cache-teacher/tokens"]] == [0]  # where iteration 1's update starts
    assert scalars["cache-teacher/tokens"][0][1] > 0 and "update/reward/teacher_loglik" in scalars


# ---------------------------------------------------------------------------------------------- W&B, offline


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B run file (records in LevelDB's log format: 32 KiB blocks, each record a crc32c,
    a little-endian length, a type (1 full, 2 first, 3 middle, 4 last) and the bytes of a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, position, pending = [], 7, b""
    while position + 7 <= len(data):
        block_left = 32768 - position % 32768
        if block_left < 7:
            position += block_left  # trailer of a block
            continue
        length, kind = struct.unpack("<HB", data[position + 4: position + 7])
        chunk = data[position + 7: position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow  # starts W&B's service process
def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "runs" / "tiny"
    log = MetricsLog(RunPaths.of(run_dir).metrics,
                     tracker=Tracker(TrackingConfig(tensorboard=False, wandb=True), run_dir, run_name="tiny"))
    for step in (1, 2):
        log.log({"iteration": 1, "step": step, "loss": 0.5 * step})
    log.close()
    files = list((run_dir / "logs" / "wandb").glob(f"offline-run-*-{wandb_run_id(run_dir)}/run-*.wandb"))
    assert len(files) == 1
    history = [row for row in wandb_history(files[0]) if "update/loss" in row]
    assert [(row["global_step"], row["update/loss"]) for row in history] == [(1, 0.5), (2, 1.0)]
