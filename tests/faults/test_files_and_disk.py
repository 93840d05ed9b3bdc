"""Issue 13, cases 7 and 9 (files): truncated and pickle weights, and a full disk, are one line each; a failed
checkpoint leaves no temporary directory behind.

The full disk is real where the tests may mount a small tmpfs (as root); elsewhere it is simulated by making the
one atomic writer's fsync fail with ENOSPC, which is where a full disk stops every output of the project.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from grpo_kd.errors import GrpoKdError

from .helpers import make_config, run_all


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_checkpoint_stops_run_with_one_line(damaged_copy):
    cfg, paths = damaged_copy
    _truncate(paths.checkpoint(2) / "model" / "model.safetensors")
    with pytest.raises(GrpoKdError) as refused:
        run_all(cfg, iterations=3)
    assert "model.safetensors" in str(refused.value) and "\n" not in str(refused.value)


def test_a_truncated_model_in_evaluate_is_one_line(tmp_path, tiny_models_quick, capsys):
    from grpo_kd.cli.app import main

    model = tmp_path / "model"
    shutil.copytree(tiny_models_quick.student, model)
    _truncate(model / "model.safetensors")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("Eg eri føddur í Havn.\nTað var ein góður dagur.\n")
    assert main(["evaluate", "--checkpoint", str(model), "--suite", "perplexity", "--text", str(heldout),
                 "--out", str(tmp_path / "reports")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cut short or damaged" in err[0]


def test_pickle_weights_are_refused_before_the_rollout(tmp_path, fault_config, tiny_models_quick):
    import torch
    from safetensors.torch import load_file

    from grpo_kd.paths import RunPaths

    student = tmp_path / "pickle-student"
    shutil.copytree(tiny_models_quick.student, student)
    torch.save(load_file(str(student / "model.safetensors")), student / "pytorch_model.bin")
    (student / "model.safetensors").unlink()
    cfg = fault_config(**{"model.path": student})
    with pytest.raises(GrpoKdError) as refused:
        run_all(cfg)
    assert "pytorch_model.bin" in str(refused.value) and "safetensors" in str(refused.value)
    assert not RunPaths.of(cfg.run_dir).rollouts(1).exists()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(directory, fill) of a small file system: a 4 MiB tmpfs where one can be mounted, else a directory whose
    atomic writes fail with ENOSPC once `fill(leave)` is called. `fill(leave)` leaves `leave` bytes free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                                  capture_output=True).returncode == 0

    def fill(leave: int) -> None:
        if mounted:
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))
            return
        import grpo_kd.fsutil as fsutil

        def full(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(fsutil, "fsync_tree", full)

    yield disk, fill
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # lazily: a test's traceback may hold a mapped file


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_a_full_disk_during_cache_teacher_in_process_is_one_line(small_disk, tiny_models_quick):
    from grpo_kd.train.phases import run_phase

    disk, fill = small_disk
    cfg = make_config(disk, tiny_models_quick)
    run_phase(cfg, "rollout", 1)
    fill(16 * 1024)
    with pytest.raises(GrpoKdError) as refused:
        run_phase(cfg, "cache-teacher", 1)
    assert "no space left on the device" in str(refused.value) and "cache-teacher" in str(refused.value)
    assert not _leftovers(disk)


def test_a_full_disk_at_the_checkpoint_leaves_no_temporary_directory(small_disk, tiny_models_quick):
    from grpo_kd.paths import RunPaths
    from grpo_kd.train.phases import run_phase

    disk, fill = small_disk
    cfg = make_config(disk, tiny_models_quick)
    run_phase(cfg, "rollout", 1)
    run_phase(cfg, "cache-teacher", 1)
    fill(256 * 1024)  # room for the metrics and the prepared advantages, not for a checkpoint
    with pytest.raises(GrpoKdError, match="no space left on the device"):
        run_phase(cfg, "update", 1)
    checkpoints = RunPaths.of(cfg.run_dir).checkpoints
    assert not _leftovers(disk) and not (checkpoints / "iter_0001").exists()
