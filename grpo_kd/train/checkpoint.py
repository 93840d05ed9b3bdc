"""Checkpoints that survive a kill and never unpickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory:

    model/                      `save_pretrained` output: full weights or a peft adapter (safetensors)
    optimizer.safetensors       every tensor of the optimizer state, keyed "state.<param index>.<name>"
    optimizer.json              param_groups and the non-tensor state entries
    scheduler.json              the LR scheduler's state_dict (plain numbers only)
    rng.safetensors             torch CPU (and CUDA) generator states
    trainer_state.json          iteration, step, epoch, data position, python RNG state, last metrics
    checksums.json              the sha256 of every file above, written last (fsutil.write_checksums)

Every file is checked against checksums.json before it is used (`restore_checkpoint` here, the weights in
`grpo_kd.models` when they are loaded): a flipped byte is one line naming the file, never a silent load.
It is written through `fsutil.atomic_path` (into `<dir>.tmp-<pid>`, then renamed into place), so a directory that exists is complete, and an
existing directory is never rewritten. The end of an update phase writes `checkpoints/iter_NNNN/` (phase 0, SFT,
writes `checkpoints/iter_0000/`, the student of iteration 1; its presence
marks the phase as done); a save in the middle of the phase (a SLURM pre-timeout signal, or
`checkpoint.save_every_steps`) writes `checkpoints/iter_NNNN.step-SSSSSSS/`, which `--resume` continues from;
older step checkpoints are pruned after a newer one is complete, and all of them after the final save.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import ChecksumMismatch, atomic_path, atomic_write_json, verify_checksums, write_checksums
from grpo_kd.paths import RunPaths

MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.json"


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any],
    tokenizer: Any | None = None,
) -> Path:
    """Write a complete checkpoint to `directory` atomically. An existing `directory` is complete: left as is."""
    directory = Path(directory)
    if directory.exists():
        return directory
    with atomic_path(directory) as tmp:  # a failed attempt (a full disk) removes its temporary directory
        tmp.mkdir()
        _unwrap(model).save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        if optimizer is not None:
            _save_optimizer(optimizer, tmp)
        if scheduler is not None:
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        _write_json(tmp / TRAINER_STATE, {**state, "python_rng": _python_rng_state()})
        write_checksums(tmp)  # last: the list covers every file above
    return directory


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint's files (or one file, or its `model/`) against its checksums.json: one line naming the
    damaged file otherwise. A checkpoint of an earlier version, without the list, passes unchecked."""
    try:
        verify_checksums(path)
    except ChecksumMismatch as exc:
        raise ChecksumMismatch(f"{exc}: the checkpoint is damaged; remove it to train its iteration again") from None


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise GrpoKdError(f"{directory} is not a complete checkpoint: {TRAINER_STATE} is missing")
    verify_checkpoint(path)
    return json.loads(path.read_text(encoding="utf-8"))


def restore_checkpoint(
    directory: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG state from `directory`; returns the trainer state.

    The model weights are loaded by `grpo_kd.models.load_student(..., checkpoint=directory / "model")`.
    """
    directory = Path(directory)
    state = load_trainer_state(directory)
    if optimizer is not None:
        _load_optimizer(optimizer, directory)
    if scheduler is not None:
        verify_checkpoint(directory / "scheduler.json")
        scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text(encoding="utf-8")))
    if restore_rng:
        verify_checkpoint(directory / "rng.safetensors")
        _restore_rng(load_file(str(directory / "rng.safetensors")), state.get("python_rng"))
    return state


def model_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / MODEL_DIR


def student_checkpoint(paths: RunPaths, iteration: int) -> Path | None:
    """The student of iteration `iteration`, the one that samples its rollouts: at iteration 1 the model of the SFT
    phase's checkpoints/iter_0000 when it exists, else None (the initial model); later the model of the update
    checkpoint of iteration - 1."""
    if iteration == 1:
        sft = model_dir(paths.checkpoint(0))
        return sft if sft.is_dir() else None
    directory = model_dir(paths.checkpoint(iteration - 1))
    if not directory.is_dir():
        raise GrpoKdError(f"the student of iteration {iteration} is missing: {directory} does not exist; "
                          f"the update of iteration {iteration - 1} is not finished (run grpo-kd update "
                          f"--iteration {iteration - 1})")
    return directory


def step_checkpoint(final: str | Path, step: int) -> Path:
    """The mid-phase checkpoint directory of `final` (checkpoints/iter_NNNN) at optimizer step `step`."""
    final = Path(final)
    return final.with_name(f"{final.name}.step-{step:07d}")


def step_checkpoints(final: str | Path) -> list[Path]:
    """Complete mid-phase checkpoints of `final`, oldest first (temporary directories are not listed)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.glob(f"{final.name}.step-*") if p.is_dir() and ".tmp-" not in p.name]
    return sorted(found, key=lambda p: p.name)


def prune_step_checkpoints(final: str | Path, keep_last: int = 0) -> None:
    """Remove all but the `keep_last` newest mid-phase checkpoints of `final` (and stale temporaries)."""
    final = Path(final)
    stale = [p for p in final.parent.glob(f"{final.name}*.tmp-*")] if final.parent.is_dir() else []
    doomed = step_checkpoints(final)
    doomed = doomed[: len(doomed) - keep_last] if keep_last else doomed
    for path in doomed + stale:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- optimizer


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    _write_json(directory / "optimizer.json", {"param_groups": state_dict["param_groups"], "scalars": scalars})


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    verify_checkpoint(directory / "optimizer.json")
    verify_checkpoint(directory / "optimizer.safetensors")
    meta = json.loads((directory / "optimizer.json").read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(directory / "optimizer.safetensors")).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------------------------- RNG


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = rng
    return tensors


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, torch.Tensor], python_state: list[Any] | None) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------------------------- files


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP/FSDP wrapper, which is what `save_pretrained` belongs to."""
    return getattr(model, "module", model)


def _write_json(path: Path, obj: Any) -> None:
    try:
        atomic_write_json(path, obj)
    except TypeError as exc:
        raise TypeError(f"{path.name}: state is not plain JSON ({exc}); checkpoints never pickle") from None
