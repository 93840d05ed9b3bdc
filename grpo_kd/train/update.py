"""The update phase: the student trains on one iteration's rollouts and teacher cache, then checkpoints.

    run_update(cfg, iteration=1)                   # what `grpo-kd update` calls (also under torchrun)

Flow: load the student (checkpoint i-1, or the initial model) -> open the rollouts and the cache (whole groups)
-> `prepare` every group once (named rewards, advantages; saved to iter_i/prepared.safetensors so a resumed run
uses the very same values) -> `epochs_per_iteration` epochs of optimizer steps -> checkpoints/iter_i/.

The data plan. One optimizer step takes `micro_batch_size x grad_accum` completions (whole groups) per rank, so
`micro_batch_size x grad_accum` must be a multiple of the group size. Epoch e visits the groups in a permutation
seeded by (seed, iteration, e), cut into steps of `ranks x groups per rank` groups (a partial last step is
dropped, with a warning); rank r takes its contiguous slice of each step. The global batch of a step therefore
does not depend on how it is split over ranks and micro-batches, and each loss is normalised by counts of the
whole step (algorithms/common.py): one process, many micro-batches, or many ranks give the same update.
Every rank prepares every group (cheap: cached quantities; only PPO's value pass is repeated on each rank), so
a rank can train on any group in any epoch.

Non-finite values: the rewards and advantages are checked once prepared, the loss of every micro-batch and the
gradient norm at every step, and the weights before any checkpoint is written. A step with a NaN or inf loss or
gradient norm takes no optimizer step; with `optim.nonfinite: stop` (the default) the phase then raises
`NonFiniteUpdate` (one line naming the step and the first non-finite quantity, no checkpoint written), with
`skip` it goes on and the step's metrics line says `"skipped": 1`.

Stops and restarts: SIGTERM / SIGUSR2 / SIGHUP (and `checkpoint.save_every_steps`) write
checkpoints/iter_i.step-SSSSSSS after the current step; on a signal the phase then raises `UpdateInterrupted`
(the CLI exits with REQUEUE_EXIT_CODE). `resume=True` continues from the newest step checkpoint (weights,
optimizer, scheduler, RNG, data position; metrics after it are dropped). A finished iteration (checkpoints/iter_i
exists, and matches its checksums) does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grpo_kd.cache.reader import CacheBatch, CacheReader
from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import load_tokenizer, tokenizer_fingerprint
from grpo_kd.paths import RunPaths
from grpo_kd.progress import progress
from grpo_kd.train import algorithms
from grpo_kd.train.algorithms import Algorithm
from grpo_kd.train.algorithms.common import (
    Context,
    Prepared,
    StepNorm,
    concat_prepared,
    split_groups,
    take_prepared,
    take_rows,
    to_device,
    with_live_reference,
)
from grpo_kd.train.checkpoint import prune_step_checkpoints, verify_checkpoint
from grpo_kd.train.distributed import Dist, TrainModule, all_reduce_sum, barrier, init_distributed, shutdown, wrap
from grpo_kd.train.fsdp import ShardedOptimizer, grad_norm_value, is_sharded
from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.optim import build_optimizer, build_scheduler
from grpo_kd.train.pretrain import PretrainBatches, pretrain_loss
from grpo_kd.train.signals import stop_on_signals
from grpo_kd.train.tracking import Tracker
from grpo_kd.train.update_state import (
    NonFiniteUpdate,
    Plan,
    StepStats,
    UpdateRun,
    load_prepared,
    load_student_parts,
    make_reference,
    save_prepared,
    save_state,
    start_point,
)

log = logging.getLogger(__name__)


class UpdateInterrupted(Exception):
    """A stop signal arrived; the step checkpoint `checkpoint` is complete. Exit with REQUEUE_EXIT_CODE."""

    def __init__(self, checkpoint: Path, signal_name: str | None):
        super().__init__(f"update stopped by {signal_name} after checkpoint {checkpoint}; run again with --resume")
        self.checkpoint = checkpoint


def run_update(cfg: Config, iteration: int, *, resume: bool = False) -> Path:
    """Train iteration `iteration`; returns checkpoints/iter_NNNN (immediately if it already exists)."""
    paths = RunPaths.of(cfg.run_dir)
    final = paths.checkpoint(iteration)
    if final.exists():
        verify_checkpoint(final)  # a finished update whose files were damaged since is not "done"
        log.info("update of iteration %d is already done: %s", iteration, final)
        return final
    dist = init_distributed(cfg.model.device)
    try:
        return _train(cfg, iteration, resume, paths, dist)
    finally:
        shutdown(dist)


def open_reader(cfg: Config, paths: RunPaths, iteration: int, tokenizer, algorithm: Algorithm) -> CacheReader:
    teacher_dir = paths.teacher(iteration)
    return CacheReader.open(
        paths.rollouts(iteration), teacher_dir if teacher_dir.is_dir() else None,
        student_vocab=tokenizer_fingerprint(tokenizer), require_token_level=algorithm.NEEDS_TOKEN_LEVEL,
    )  # fmt: skip


def make_plan(reader: CacheReader, cfg: Config, world_size: int) -> Plan:
    if reader.num_groups == 0:
        raise GrpoKdError("the rollouts of this iteration hold no group")
    sizes = reader.group_lengths()[:, 0]
    if (sizes != cfg.rollout.group_size).any():  # the config's rules relate group_size to the batch sizes
        raise GrpoKdError(f"the rollouts of this iteration hold groups of {sorted(set(sizes.tolist()))} completions "
                          f"but rollout.group_size={cfg.rollout.group_size}; sample them again with this config")
    rows_per_rank = cfg.optim.micro_batch_size * cfg.optim.grad_accum
    plan = Plan(groups_per_rank=rows_per_rank // cfg.rollout.group_size, world_size=world_size,
                num_groups=reader.num_groups, epochs=cfg.optim.epochs_per_iteration)
    if plan.steps_per_epoch == 0:
        raise GrpoKdError(f"{reader.num_groups} groups are fewer than one optimizer step needs "
                          f"({plan.groups_per_step} = {world_size} ranks x {plan.groups_per_rank}); lower "
                          "optim.micro_batch_size or optim.grad_accum")
    dropped = reader.num_groups - plan.steps_per_epoch * plan.groups_per_step
    if dropped:
        log.warning("%d of %d groups do not fill a last step and are left out of each epoch", dropped,
                    reader.num_groups)
    return plan


def step_groups(plan: Plan, seed: int, iteration: int, index: int, rank: int) -> list[int]:
    """The groups rank `rank` trains on in step `index` (0-based over all epochs of the iteration)."""
    epoch, within = divmod(index, plan.steps_per_epoch)
    order = np.random.default_rng([seed, iteration, epoch]).permutation(plan.num_groups)
    start = within * plan.groups_per_step + rank * plan.groups_per_rank
    return order[start : start + plan.groups_per_rank].tolist()


def prepare_all(run: UpdateRun) -> dict[int, Prepared]:
    """`prepare` on every group, in chunks of one step's worth of groups; {group index: Prepared}."""
    prepared = {}
    reader = run.reader
    for start in range(0, reader.num_groups, run.plan.groups_per_rank):
        groups = list(range(start, min(start + run.plan.groups_per_rank, reader.num_groups)))
        batch = reader.batch(groups)
        with torch.no_grad():
            result = run.algorithm.prepare(batch, run.cfg, run.ctx)
        why = nonfinite_prepared(result)
        if why:
            raise NonFiniteUpdate(f"update of iteration {run.iteration}: {why} in groups {groups[0]}..{groups[-1]} "
                                  "before any step; nothing was trained")
        prepared.update(zip(groups, split_groups(result, batch.group_ids)))
    return prepared


def nonfinite_prepared(prepared: Prepared) -> str | None:
    """The first reward component or advantage of `prepared` holding NaN or inf, named; None when all are finite."""
    named = {**{f"reward {k}": v for k, v in prepared.rewards.items()},
             **{k: v for k, v in prepared._asdict().items() if k != "rewards" and torch.is_tensor(v)}}
    for name, value in named.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"the {name} values are not finite"
    return None


def _train(cfg: Config, iteration: int, resume: bool, paths: RunPaths, dist: Dist) -> Path:
    """The main loop (long by nature: it wires every part once; each part lives in its own function)."""
    run = _setup(cfg, iteration, resume, paths, dist)
    done = run.done
    prepared_path = paths.iteration(iteration) / "prepared.safetensors"
    prepared = load_prepared(prepared_path) if done else None
    if prepared is None:
        prepared = prepare_all(run)
        if dist.is_main:
            save_prepared(prepared_path, prepared)
    pretrain = PretrainBatches(cfg, run.tokenizer) if cfg.loss.pt.weight > 0 else None
    if pretrain is not None and cfg.loss.pt.batch_size < dist.world_size:
        raise GrpoKdError(f"loss.pt.batch_size={cfg.loss.pt.batch_size} is smaller than the {dist.world_size} ranks")
    metrics_log = MetricsLog(paths.metrics, tracker=Tracker.for_run(cfg) if dist.is_main else None)
    if dist.is_main:
        metrics_log.truncate_after(iteration, done)
    barrier(dist)
    plan = run.plan
    log.info("update %d: %s, %d groups, %d steps x %d epochs, starting after step %d", iteration,
             cfg.loss.algorithm, plan.num_groups, plan.steps_per_epoch, plan.epochs, done)

    def one_step(index: int) -> StepStats:
        groups = step_groups(plan, cfg.seed, iteration, index, dist.rank)
        pt_blocks = pretrain.draw(iteration, index, dist.rank, dist.world_size) if pretrain else None
        return train_step(run, run.reader.batch(groups), concat_prepared([prepared[g] for g in groups]),
                          pt_blocks=pt_blocks, pt_tokens=pretrain.tokens_per_step if pretrain else 0)

    run_steps(run, plan.total_steps, one_step, metrics_log, f"update {iteration}")
    if dist.is_main:
        prepared_path.unlink(missing_ok=True)
    return run.final


def run_steps(run: UpdateRun, total: int, one_step: Callable[[int], StepStats], metrics_log: MetricsLog,
              label: str) -> None:
    """Optimizer steps `run.done` .. `total - 1` (`one_step(index)` takes one), each logged; a step checkpoint on a
    stop signal (then `UpdateInterrupted`) or every `checkpoint.save_every_steps`; at the end the final checkpoint.
    The loop of the update and of phase 0 (sft.py), so both stop, resume and checkpoint the same way."""
    cfg, dist, plan = run.cfg, run.dist, run.plan
    with stop_on_signals() as stop:
        for index in progress(range(run.done, total), label, total=total - run.done):
            stats = one_step(index)
            record = {"iteration": run.iteration, "step": index + 1, "epoch": index // plan.steps_per_epoch,
                      **stats.record}
            if dist.is_main:
                metrics_log.log(record)
            if stats.nonfinite is not None and cfg.optim.nonfinite == "stop":
                what = f"update of iteration {run.iteration}" if run.iteration else "sft (phase 0)"
                raise NonFiniteUpdate(
                    f"{what} stopped at step {index + 1} of {total}: "
                    f"{stats.nonfinite}; no checkpoint written (lower optim.lr={cfg.optim.lr:g}, or set "
                    "optim.nonfinite=skip to skip such steps)")
            stopping = bool(all_reduce_sum(torch.tensor([float(stop.requested)]), dist)[0] > 0)
            periodic = cfg.checkpoint.save_every_steps and (index + 1) % cfg.checkpoint.save_every_steps == 0
            if (stopping or periodic) and index + 1 < total:
                saved = save_state(run, index + 1, record, step=True)
                if stopping:
                    raise UpdateInterrupted(saved, stop.signal_name)
    save_state(run, total, None, step=False)
    metrics_log.close()
    if dist.is_main:
        prune_step_checkpoints(run.final, 0)


def _setup(cfg: Config, iteration: int, resume: bool, paths: RunPaths, dist: Dist) -> UpdateRun:
    """Load the data, the student, its optimizer and reference; restore the start point (`run.done` steps)."""
    algorithm = algorithms.get(cfg.loss.algorithm)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    reader = open_reader(cfg, paths, iteration, tokenizer, algorithm)
    plan = make_plan(reader, cfg, dist.world_size)
    start = start_point(paths, iteration, resume, dist)
    torch.manual_seed(cfg.seed * 1_000_003 + iteration)
    random.seed(cfg.seed * 1_000_003 + iteration)  # nothing draws from it, but checkpoints record its state
    train_module = TrainModule(*load_student_parts(cfg, start, dist, algorithm.NEEDS_VALUE_HEAD))
    module = wrap(train_module, dist, cfg)
    sharded = is_sharded(train_module)  # FSDP: parameters are shards, whole only inside the forward
    optimizer = build_optimizer(train_module.named_parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.iterations * plan.total_steps)
    done = start.restore(ShardedOptimizer(optimizer, dist) if sharded else optimizer, scheduler, plan)
    reference = make_reference(cfg, train_module.policy, dist, module if sharded else None)
    ctx = Context(module=module, policy=train_module.policy, reference=reference, impl=cfg.optim.impl,
                  temperature=cfg.rollout.temperature)
    return UpdateRun(cfg=cfg, iteration=iteration, paths=paths, dist=dist, algorithm=algorithm, tokenizer=tokenizer,
                     plan=plan, train_module=train_module, optimizer=optimizer, scheduler=scheduler, ctx=ctx,
                     reader=reader, done=done)


def train_step(run: UpdateRun, batch: CacheBatch, prepared: Prepared, *, pt_blocks: torch.Tensor | None,
               pt_tokens: int) -> StepStats:
    """One optimizer step over this rank's rows: L_PT units first, then the micro-batches, one backward each."""
    started = time.perf_counter()
    cfg, ctx, dist = run.cfg, run.ctx, run.dist
    B = batch.completion_ids.shape[0]
    counts = all_reduce_sum(torch.tensor([B, float(batch.completion_mask.sum())], dtype=torch.float64), dist)
    ctx.norm = StepNorm(sequences=int(counts[0]), tokens=int(counts[1]), world_size=dist.world_size)
    pt = pt_units(pt_blocks, cfg, ctx, pt_tokens)
    stats, grad_norm = optimizer_step(run, pt + rl_units(run.algorithm, batch, prepared, cfg, ctx), num_pt=len(pt))
    stats.add_rewards(prepared, batch.completion_mask.float())
    stats.set("ref_source", "cache" if batch.ref_logprobs is not None else ("live" if ctx.reference else "none"))
    return stats.finish(grad_norm_value(grad_norm), counts[1] + pt_tokens, time.perf_counter() - started)


def optimizer_step(run: UpdateRun, units: list, *, num_pt: int = 0) -> tuple[StepStats, torch.Tensor]:
    """One optimizer step over `units` ((token weight, closure -> (loss, metrics)), one backward each; DDP
    synchronises on the last; the first `num_pt` are L_PT units): accumulate, clip, step the optimizer and the
    schedule. A non-finite loss or gradient norm on any rank skips the optimizer step (`stats.nonfinite` says
    what). Shared with sft.py."""
    cfg, ctx, dist, optimizer = run.cfg, run.ctx, run.dist, run.optimizer
    stats = StepStats(dist)
    optimizer.zero_grad(set_to_none=True)
    bad = None  # the first non-finite quantity of this rank
    for position, (weight, compute) in enumerate(units):
        last = position == len(units) - 1
        ddp_accumulating = dist.active and not last and hasattr(ctx.module, "no_sync")  # FSDP reduces every time
        sync = ctx.module.no_sync() if ddp_accumulating else contextlib.nullcontext()
        with sync:
            loss, metrics = compute()
            loss.backward()
        value = stats.add_loss(loss)
        if bad is None and not math.isfinite(value):
            what = "L_PT loss" if position < num_pt else "loss"
            bad = f"the {what} of micro-batch {position + 1} of {len(units)} is {value}"
        stats.add_metrics(metrics, weight)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    if bad is None and not math.isfinite(grad_norm_value(grad_norm)):
        bad = f"the gradient norm is {grad_norm_value(grad_norm)}"
    stats.set("lr", run.scheduler.get_last_lr()[0])  # the rate this step used
    if all_reduce_sum(torch.tensor([float(bad is not None)]), dist)[0] > 0:  # every rank skips the same step
        stats.nonfinite = bad or "a loss or gradient on another rank is not finite"
        stats.set("nonfinite", stats.nonfinite)  # text: what was not finite (not a curve of `grpo-kd report`)
        stats.set("skipped", 1)
        optimizer.zero_grad(set_to_none=True)  # no optimizer step: the weights stay as they were
    else:
        optimizer.step()
    run.scheduler.step()
    return stats, grad_norm


def rl_units(algorithm: Algorithm, batch: CacheBatch, prepared, cfg: Config, ctx: Context) -> list:
    """(token weight, closure -> (loss, metrics)) per micro-batch of `micro_batch_size` rows."""
    units = []
    B = batch.completion_ids.shape[0]
    device = ctx.policy.get_input_embeddings().weight.device
    for start in range(0, B, cfg.optim.micro_batch_size):
        rows = list(range(start, min(start + cfg.optim.micro_batch_size, B)))
        micro = take_rows(batch, rows)
        micro_prepared = to_device(take_prepared(prepared, rows, micro.completion_ids.shape[1]), device)
        micro = with_live_reference(to_device(micro, device), cfg, ctx)
        weight = float(micro.completion_mask.sum())
        units.append((weight, lambda m=micro, p=micro_prepared: algorithm.micro_loss(m, p, cfg, ctx)))
    return units


def pt_units(blocks: torch.Tensor | None, cfg: Config, ctx: Context, pt_tokens: int) -> list:
    """L_PT micro-batches of this rank's pre-training blocks, each scaled to its share of the step's L_PT."""
    if blocks is None or len(blocks) == 0:
        return []
    scale = cfg.loss.pt.weight * ctx.norm.world_size / max(pt_tokens, 1)
    units = []
    for start in range(0, len(blocks), cfg.optim.micro_batch_size):
        chunk = blocks[start : start + cfg.optim.micro_batch_size]

        def compute(chunk=chunk):
            loss = pretrain_loss(ctx.module, ctx.policy, chunk, scale=scale, impl=ctx.impl)
            return loss, {"pt_loss": loss.detach() / scale / (chunk.numel() - len(chunk))}

        units.append((float(chunk.numel() - len(chunk)), compute))
    return units
