"""The update phase's state around the loop: where it starts, what it saves, what it logs.

- `start_point`: a step checkpoint of this iteration (`--resume`), the final checkpoint of iteration i-1 (for
  iteration 1 the SFT phase's checkpoints/iter_0000 when it exists: its weights only), or the initial model;
  `StartPoint.restore` brings back the optimizer, scheduler, RNG and data position. Phase 0 (sft.py) is
  "iteration 0" here: it starts from the initial model and resumes from its own step checkpoints.
- `save_state`: a step or final checkpoint through `grpo_kd.train.checkpoint.save_checkpoint` (rank 0 writes;
  the model directory holds `save_pretrained` output — the adapter only with LoRA — plus PPO's value head).
- `save_prepared` / `load_prepared`: the iteration's advantages, so a resumed run trains on the same ones even
  when they came from a model (PPO's values).
- `StepStats`: one step's metrics, reduced over micro-batches and ranks into one `logs/metrics.jsonl` line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from grpo_kd.cache.reader import CacheReader
from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_path
from grpo_kd.kernels import linear_logprobs
from grpo_kd.models import adapters_disabled, as_peft_model, lm_head, load_student
from grpo_kd.paths import RunPaths
from grpo_kd.train.algorithms import Algorithm
from grpo_kd.train.algorithms.common import Context, Prepared
from grpo_kd.train.checkpoint import (
    load_trainer_state,
    model_dir,
    prune_step_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    step_checkpoint,
    step_checkpoints,
)
from grpo_kd.train.distributed import Dist, TrainModule, all_reduce_sum, barrier, new_value_head, student_config
from grpo_kd.train.fsdp import ShardedOptimizer, full_state, is_sharded

log = logging.getLogger(__name__)
VALUE_HEAD_FILE = "value_head.safetensors"


class NonFiniteUpdate(GrpoKdError):
    """A step's loss or gradient norm, the prepared rewards, or the weights are NaN or inf: nothing was saved."""


@dataclass(frozen=True)
class Plan:
    """How the iteration's groups are cut into optimizer steps (see update.py)."""

    groups_per_rank: int
    world_size: int
    num_groups: int
    epochs: int

    @property
    def groups_per_step(self) -> int:
        return self.groups_per_rank * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_groups // self.groups_per_step

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


# ---------------------------------------------------------------------------------------------- starting


@dataclass(frozen=True)
class StartPoint:
    checkpoint: Path | None
    kind: str  # "step" (resume), "previous" (iteration i-1), "sft" (phase 0, before iteration 1), "initial"

    def restore(self, optimizer, scheduler, plan: Plan) -> int:
        """Load optimizer/scheduler (and RNG for a resume); returns the optimizer steps already done. After SFT the
        weights only: the RL run takes a fresh optimizer and its own learning-rate schedule."""
        if self.checkpoint is None or self.kind == "sft":
            return 0
        has_optimizer = (self.checkpoint / "optimizer.json").is_file()
        if self.kind == "previous":
            if has_optimizer:
                try:
                    restore_checkpoint(self.checkpoint, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
                except (ValueError, KeyError) as exc:  # other trainable parameters (LoRA switched, a value head)
                    log.warning("the optimizer state of %s does not fit this student (%s): starting a fresh one",
                                self.checkpoint, exc)
            return 0
        state = load_trainer_state(self.checkpoint)
        if state.get("plan") != dataclasses.asdict(plan):
            raise GrpoKdError(f"cannot resume from {self.checkpoint}: it was made with the data plan "
                              f"{state.get('plan')}, this run has {dataclasses.asdict(plan)} (same ranks, batch "
                              "sizes and epochs are needed)")
        restore_checkpoint(self.checkpoint, optimizer=optimizer if has_optimizer else None, scheduler=scheduler)
        log.info("resuming iteration %d after step %d from %s", state["iteration"], state["step"], self.checkpoint)
        return int(state["step"])


def start_point(paths: RunPaths, iteration: int, resume: bool, dist: Dist) -> StartPoint:
    final = paths.checkpoint(iteration)
    steps = step_checkpoints(final)
    if resume and steps:
        return StartPoint(steps[-1], "step")
    if resume:
        log.info("nothing to resume for iteration %d: starting it from the beginning", iteration)
    elif steps:
        log.warning("iteration %d has step checkpoints but --resume was not given: starting over", iteration)
        if dist.is_main:
            prune_step_checkpoints(final, 0)
        barrier(dist)
    if iteration == 1 and paths.checkpoint(0).is_dir():
        return StartPoint(paths.checkpoint(0), "sft")
    if iteration > 1:
        previous = paths.checkpoint(iteration - 1)
        if not previous.is_dir():
            raise GrpoKdError(f"iteration {iteration} starts from {previous}, which does not exist; run the update "
                              f"of iteration {iteration - 1} first")
        return StartPoint(previous, "previous")
    return StartPoint(None, "initial")


def load_student_parts(cfg: Config, start: StartPoint, dist: Dist, value_head: bool):
    """(student, value head | None) from the start point's `model/` directory, or the initial model."""
    source = model_dir(start.checkpoint) if start.checkpoint is not None else None
    policy = load_student(student_config(cfg, dist), checkpoint=str(source) if source else None, trainable=True)
    head = None
    if value_head:
        head = new_value_head(policy)
        saved = source / VALUE_HEAD_FILE if source is not None else None
        if saved is not None and saved.is_file():
            head.load_state_dict(load_file(str(saved), device=str(dist.device)))
    return policy, head


class Reference:
    """Live reference log-probs (B, T): the student with adapters off (LoRA), or the initial model, loaded lazily."""

    def __init__(self, cfg: Config, policy, dist: Dist, module=None):
        self.cfg, self.policy, self.dist = cfg, policy, dist
        self.module = module  # the FSDP-sharded train module: the policy's shards are only whole through it
        self.uses_adapters = as_peft_model(policy) is not None
        self.model = None

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        if self.uses_adapters:
            with adapters_disabled(self.policy):
                return self._logprobs(self.module or TrainModule(self.policy), self.policy, batch)
        if self.model is None:
            model_cfg = dataclasses.replace(student_config(self.cfg, self.dist), lora=False)
            self.model = load_student(model_cfg, checkpoint=None, trainable=False)
            log.info("reference log-probs: computed live with the initial model %s", model_cfg.path)
        return self._logprobs(TrainModule(self.model), self.model, batch)

    def _logprobs(self, module, model, batch) -> torch.Tensor:
        def completion_logprobs(hidden, _values):  # hidden (B, T, H), inside the forward
            head = lm_head(model)
            return linear_logprobs(hidden, head.weight, batch.completion_ids.to(hidden.device), bias=head.bias,
                                   softcap=head.softcap, temperature=self.cfg.rollout.temperature,
                                   impl=self.cfg.optim.impl)[0]  # (B, T)

        logprobs = module(batch.input_ids, batch.attention_mask, batch.prompt_lengths, batch.completion_ids.shape[1],
                          completion_logprobs)  # (B, T)
        mask = batch.completion_mask.to(logprobs.device)
        return (logprobs * mask).to(batch.completion_ids.device)  # (B, T) where the batch lives


def make_reference(cfg: Config, policy, dist: Dist, module=None) -> Reference | None:
    needed = cfg.loss.reference_beta != 0.0 or cfg.loss.algorithm == "self_distill"
    return Reference(cfg, policy, dist, module) if needed else None


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class UpdateRun:
    """What the update loop of one iteration holds: its settings, the data plan, the student and its optimizer.
    Built once by `update._train`; the step and the checkpoint functions take it instead of a dozen arguments."""

    cfg: Config
    iteration: int
    paths: RunPaths
    dist: Dist
    algorithm: Algorithm | None  # None: phase 0 (SFT), which trains on text, not on rollouts
    tokenizer: Any
    reader: CacheReader | None  # the iteration's rollouts and teacher cache, whole groups (None for SFT)
    plan: Plan
    train_module: TrainModule  # the bare student (+ value head): what is saved
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ctx: Context  # ctx.module is the DDP/FSDP-wrapped train module: what is trained
    done: int  # optimizer steps already done when the phase started (a resumed run)

    @property
    def final(self) -> Path:
        return self.paths.checkpoint(self.iteration)


# ---------------------------------------------------------------------------------------------- saving


class _SaveView:
    """What `save_checkpoint` saves as `model/`: the student's own `save_pretrained` plus the value head.
    `full` (FSDP): the train module's gathered state dict, saved instead of the sharded parameters."""

    def __init__(self, policy, value_head, full: dict[str, torch.Tensor] | None = None):
        self.policy, self.value_head, self.full = policy, value_head, full

    def _part(self, prefix: str) -> dict[str, torch.Tensor] | None:
        return None if self.full is None else {k[len(prefix):]: v for k, v in self.full.items() if k.startswith(prefix)}

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        policy_state = self._part("policy.")
        extra = {} if policy_state is None else {"state_dict": policy_state}
        self.policy.save_pretrained(path, safe_serialization=True, **extra)
        if self.value_head is not None:
            head = self._part("value_head.") or self.value_head.state_dict()
            tensors = {k: v.detach().cpu().contiguous() for k, v in head.items()}
            save_file(tensors, str(Path(path) / VALUE_HEAD_FILE))


class _Gathered:
    """An optimizer state gathered by `ShardedOptimizer.state_dict()`, for `save_checkpoint` on rank 0."""

    def __init__(self, state_dict: dict):
        self._state_dict = state_dict

    def state_dict(self) -> dict:
        return self._state_dict


def save_state(run: UpdateRun, steps_done: int, record: dict | None, *, step: bool) -> Path:
    """Write a step checkpoint (step=True) or the iteration's final one; rank 0 writes, everyone waits."""
    cfg, dist, plan, train_module, optimizer = run.cfg, run.dist, run.plan, run.train_module, run.optimizer
    target = step_checkpoint(run.final, steps_done) if step else run.final
    check_finite_weights(run, steps_done)
    full = optimizer_state = None
    if is_sharded(train_module):  # every rank gathers its shards (collective); rank 0 keeps the whole tensors
        full = full_state(train_module, dist)
        if cfg.checkpoint.save_optimizer:
            optimizer_state = _Gathered(ShardedOptimizer(optimizer, dist).state_dict())
    if dist.is_main:
        state = {"iteration": run.iteration, "step": steps_done, "epoch": steps_done // max(plan.steps_per_epoch, 1),
                 "plan": dataclasses.asdict(plan), "finished": not step,
                 "algorithm": cfg.loss.algorithm if run.algorithm is not None else "sft",
                 "data_position": {"next_step": steps_done, "order": "permutation(seed, iteration, epoch)"},
                 "metrics": record or {},
                 "parallel": {"kind": "fsdp" if full is not None else ("ddp" if dist.active else "none"),
                              "world_size": dist.world_size}}
        save_checkpoint(target, model=_SaveView(train_module.policy, train_module.value_head, full),
                        optimizer=(optimizer_state or optimizer) if cfg.checkpoint.save_optimizer else None,
                        scheduler=run.scheduler, state=state, tokenizer=run.tokenizer)
        if step:
            prune_step_checkpoints(run.final, max(cfg.checkpoint.keep_last, 1))
    barrier(dist)
    return target


def check_finite_weights(run: UpdateRun, steps_done: int) -> None:
    """Refuse to checkpoint weights holding NaN or inf (every rank checks its own parameters or shards)."""
    bad = None
    for name, param in run.train_module.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP shard
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            bad = name
            break
    if all_reduce_sum(torch.tensor([float(bad is not None)]), run.dist)[0] > 0:
        raise NonFiniteUpdate(f"update of iteration {run.iteration}: the student's weights hold NaN or inf after "
                              f"step {steps_done} ({bad or 'on another rank'}); no checkpoint written (lower "
                              f"optim.lr={run.cfg.optim.lr:g})")


def save_prepared(path: Path, prepared: dict[int, Prepared]) -> None:
    tensors = {}
    for group, item in prepared.items():
        for name, value in item._asdict().items():
            if name == "rewards":
                tensors.update({f"{group}.rewards.{k}": v.contiguous().clone() for k, v in value.items()})
            elif value is not None:
                tensors[f"{group}.{name}"] = value.contiguous().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sha256": _tensor_digest(tensors)})


def load_prepared(path: Path) -> dict[int, Prepared] | None:
    """The advantages `save_prepared` kept for a resumed run; one line when the file was damaged since."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            stored = (handle.metadata() or {}).get("sha256")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        stored, tensors, why = None, {}, str(exc)
    else:
        why = None if stored == _tensor_digest(tensors) else "it does not match the sha256 stored in it"
    if why:
        raise GrpoKdError(f"{path} is damaged ({why}); remove it and this iteration's step checkpoints "
                          f"({path.parents[1].name}/checkpoints/{path.parent.name}.step-*) to train the iteration "
                          "again")
    fields: dict[int, dict] = {}
    for key, value in tensors.items():
        group, name = key.split(".", 1)
        entry = fields.setdefault(int(group), {"rewards": {}})
        if name.startswith("rewards."):
            entry["rewards"][name.split(".", 1)[1]] = value
        else:
            entry[name] = value
    return {group: Prepared(**entry) for group, entry in fields.items()}


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- metrics


class StepStats:
    """Sums and weights of one step's metrics; `finish` reduces them over ranks into `record`."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.loss = 0.0
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.record: dict = {}
        self.nonfinite: str | None = None  # the first non-finite quantity of the step, when it was skipped

    def add_loss(self, loss: torch.Tensor) -> float:
        value = float(loss.detach())
        self.loss += value
        return value

    def add_metrics(self, metrics: dict[str, torch.Tensor], weight: float) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def add_rewards(self, prepared: Prepared, mask: torch.Tensor) -> None:
        for name, value in prepared.rewards.items():
            key = f"reward/{name}"
            if value.ndim == 2:
                m = mask[:, : value.shape[1]]
                total, weight = float((value[:, : m.shape[1]] * m).sum()), float(m.sum())
            else:
                total, weight = float(value.float().sum()), float(value.numel())
            self.sums[key] = self.sums.get(key, 0.0) + total
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def set(self, name: str, value) -> None:
        self.record[name] = value

    def finish(self, grad_norm: torch.Tensor, tokens: float, seconds: float) -> "StepStats":
        names = sorted(self.sums)
        packed = torch.tensor([self.loss] + [self.sums[n] for n in names] + [self.weights[n] for n in names],
                              dtype=torch.float64)
        packed = all_reduce_sum(packed, self.dist)
        k = len(names)
        self.record = {
            "loss": float(packed[0]) / self.dist.world_size,
            **{n: float(packed[1 + i]) / max(float(packed[1 + k + i]), 1e-12) for i, n in enumerate(names)},
            "grad_norm": float(grad_norm),
            "tokens_per_second": float(tokens) / max(seconds, 1e-9),
            **self.record,
        }
        return self
