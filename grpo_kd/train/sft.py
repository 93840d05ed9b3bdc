"""Phase 0: supervised fine-tuning of the student before iteration 1 (MiniLLM starts from a fine-tuned student).

    run_sft(cfg)                  # what `grpo-kd sft` calls (also under torchrun); checkpoints/iter_0000

    L_SFT = -1/N sum_{examples, t} log q_theta(y_t | prompt, y_<t)      over the step's N continuation tokens

Data (`sft.*`): prompt + continuation pairs, with the loss on the continuation alone (the training prompts of
`data.*` with their continuation by default, or a source of its own), or plain text cut into blocks of
`sft.seq_len` tokens with every token trained (as L_PT does). The continuation is appended to the rendered prompt
as written and ends with eos, so the student also learns where to stop.

Key design choice: phase 0 is "iteration 0" of the update's machinery, not a second trainer. It shares the
update's start point and resume (`update_state.start_point`: the initial model, or its own step checkpoint with
`--resume`), its optimizer step (`update.optimizer_step`: micro-batches x accumulation, DDP, clipping), its loop
(`update.run_steps`: step checkpoints on SIGTERM/SIGUSR2 or every `checkpoint.save_every_steps`, the final
checkpoint, the metrics log) and its checkpoints (`update_state.save_state`), and the token-level cross-entropy of
L_PT (`pretrain.token_nll`, through `linear_logprobs`). checkpoints/iter_0000 then is iteration 1's student:
the rollout samples from it and the update starts from its weights with a fresh optimizer and schedule.
The data plan is the update's with examples in place of groups: epoch e visits the examples in a permutation
seeded by (seed, 0, e), cut into steps of `ranks x micro_batch_size x grad_accum` examples.

Not moved by SFT: the KL-to-reference term, the self-teachers' "initial model" and the reference pass still use
the initial model (`model.path`), not the fine-tuned one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import load_tokenizer
from grpo_kd.paths import RunPaths
from grpo_kd.train.algorithms.common import Context
from grpo_kd.train.distributed import Dist, TrainModule, all_reduce_sum, init_distributed, shutdown, wrap
from grpo_kd.train.fsdp import ShardedOptimizer, grad_norm_value, is_sharded
from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.optim import build_optimizer, build_scheduler
from grpo_kd.train.policy import CompletionBatch, collate
from grpo_kd.train.pretrain import text_blocks, token_nll
from grpo_kd.train.tracking import Tracker
from grpo_kd.train.update import optimizer_step, run_steps, step_groups
from grpo_kd.train.update_state import Plan, StepStats, UpdateRun, load_student_parts, start_point

log = logging.getLogger(__name__)

ITERATION = 0  # the SFT phase's place in the run: checkpoints/iter_0000, metrics lines of iteration 0

Example = tuple[list[int], list[int]]  # (prompt ids, continuation ids): the loss is on the continuation


def run_sft(cfg: Config, *, resume: bool = False) -> Path:
    """Fine-tune the student; returns checkpoints/iter_0000 (immediately if it already exists)."""
    paths = RunPaths.of(cfg.run_dir)
    final = paths.checkpoint(ITERATION)
    if final.exists():
        log.info("sft is already done: %s", final)
        return final
    dist = init_distributed(cfg.model.device)
    try:
        return _train(cfg, resume, paths, dist)
    finally:
        shutdown(dist)


# ---------------------------------------------------------------------------------------------- data


def load_examples(cfg: Config, tokenizer) -> list[Example]:
    """The SFT examples `sft.*` names, tokenized (module doc)."""
    from grpo_kd.data import detect_format, load_prompts, load_texts
    from grpo_kd.train.rollout import training_prompts

    s = cfg.sft
    if s.plain_text:  # the config's rules (loader.check_sft) saw to a source
        texts = load_texts(s.source, format=s.format, field=s.text_field, limit=s.max_examples)
        blocks = text_blocks(texts, tokenizer, s.seq_len, f"sft.source {s.source}", "sft.seq_len")  # (n, S)
        return [(block[:1], block[1:]) for block in blocks.tolist()]
    if s.source:
        line_format = detect_format(s.source, s.format) in ("text", "conllu")  # sentences, not records
        if line_format and s.prefix_words < 1:
            raise GrpoKdError(f"sft.source {s.source} is text: set sft.prefix_words (the prompt's words) for "
                              "prompt + continuation pairs, or sft.plain_text=true")
        prompts = load_prompts(s.source, format=s.format, prompt_field=s.prompt_field,
                               privileged_field=None if line_format else s.continuation_field,
                               limit=s.max_examples, prefix_words=s.prefix_words)  # fmt: skip
        joiner = " " if line_format else ""
    else:  # with data.privileged_field or data.prefix_words (loader.check_sft)
        prompts = training_prompts(cfg)[: s.max_examples]  # the rollout's own: never the held-out ones
        joiner = " " if cfg.data.prefix_words > 0 and not cfg.data.privileged_field else ""
    return [pair_example(cfg, tokenizer, p, joiner) for p in prompts]


def pair_example(cfg: Config, tokenizer, prompt, joiner: str) -> Example:
    """(the prompt as the rollout renders and encodes it, the continuation's tokens + eos, cut to sft.seq_len)."""
    from grpo_kd.data import encode_prompt, render_prompt

    if prompt.privileged is None:
        raise GrpoKdError(f"SFT example {prompt.id!r} has no continuation")
    text = render_prompt(tokenizer, prompt, chat_template=cfg.data.chat_template)
    prompt_ids = encode_prompt(tokenizer, text, chat_template=cfg.data.chat_template,
                               max_tokens=cfg.data.max_prompt_tokens)
    target = tokenizer(joiner + prompt.privileged, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target = target + [tokenizer.eos_token_id]
    return prompt_ids, target[: cfg.sft.seq_len]


def make_plan(examples: list[Example], cfg: Config, world_size: int) -> Plan:
    """The update's data plan with one example per "group" (module doc)."""
    plan = Plan(groups_per_rank=cfg.optim.micro_batch_size * cfg.optim.grad_accum, world_size=world_size,
                num_groups=len(examples), epochs=cfg.sft.epochs)
    if plan.steps_per_epoch == 0:
        raise GrpoKdError(f"{len(examples)} SFT examples are fewer than one optimizer step needs "
                          f"({plan.groups_per_step} = {world_size} ranks x optim.micro_batch_size x optim.grad_accum)")
    return plan


def total_steps(plan: Plan, cfg: Config) -> int:
    return min(plan.total_steps, cfg.sft.max_steps) if cfg.sft.max_steps > 0 else plan.total_steps


# ---------------------------------------------------------------------------------------------- training


def _train(cfg: Config, resume: bool, paths: RunPaths, dist: Dist) -> Path:
    run, examples = _setup(cfg, resume, paths, dist)
    metrics_log = MetricsLog(paths.metrics, tracker=Tracker.for_run(cfg) if dist.is_main else None, phase="sft")
    if dist.is_main:
        metrics_log.truncate_after(ITERATION, run.done)
    total = total_steps(run.plan, cfg)
    log.info("sft: %d examples, %d steps, starting after step %d", run.plan.num_groups, total, run.done)

    def one_step(index: int) -> StepStats:
        rows = [examples[i] for i in step_groups(run.plan, cfg.seed, ITERATION, index, dist.rank)]
        return sft_step(run, collate([p for p, _ in rows], [c for _, c in rows]))

    run_steps(run, total, one_step, metrics_log, "sft")
    return run.final


def _setup(cfg: Config, resume: bool, paths: RunPaths, dist: Dist) -> tuple[UpdateRun, list[Example]]:
    """Tokenize the examples, load the student and its optimizer; restore a step checkpoint with `resume`. The
    update's run state, without an algorithm or a cache reader."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    examples = load_examples(cfg, tokenizer)
    plan = make_plan(examples, cfg, dist.world_size)
    start = start_point(paths, ITERATION, resume, dist)
    torch.manual_seed(cfg.seed * 1_000_003)
    train_module = TrainModule(*load_student_parts(cfg, start, dist, value_head=False))
    module = wrap(train_module, dist, cfg)
    sharded = is_sharded(train_module)
    optim = dataclasses.replace(cfg.optim, lr=cfg.sft.lr if cfg.sft.lr is not None else cfg.optim.lr)
    optimizer = build_optimizer(train_module.named_parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, total_steps(plan, cfg))
    done = start.restore(ShardedOptimizer(optimizer, dist) if sharded else optimizer, scheduler, plan)
    ctx = Context(module=module, policy=train_module.policy, impl=cfg.optim.impl)
    run = UpdateRun(cfg=cfg, iteration=ITERATION, paths=paths, dist=dist, algorithm=None, tokenizer=tokenizer,
                    reader=None, plan=plan, train_module=train_module, optimizer=optimizer, scheduler=scheduler,
                    ctx=ctx, done=done)
    return run, examples


def sft_step(run: UpdateRun, batch: CompletionBatch) -> StepStats:
    """One optimizer step over this rank's examples: micro-batches of `optim.micro_batch_size`, each scaled to
    its share of the step's token mean (the sum over the micro-batch's tokens / the step's tokens, x ranks)."""
    started = time.perf_counter()
    ctx, dist = run.ctx, run.dist
    tokens = float(all_reduce_sum(torch.tensor([float(batch.completion_mask.sum())], dtype=torch.float64), dist)[0])
    scale = dist.world_size / max(tokens, 1.0)
    device = ctx.policy.get_input_embeddings().weight.device
    units = []
    step = run.cfg.optim.micro_batch_size
    for start in range(0, batch.input_ids.shape[0], step):
        micro = CompletionBatch(*(t[start : start + step] for t in batch)).to(device)
        weight = float(micro.completion_mask.sum())

        def compute(micro=micro, weight=weight):
            loss = token_nll(ctx.module, ctx.policy, micro, scale=scale, impl=ctx.impl)
            return loss, {"nll": loss.detach() / scale / max(weight, 1.0)}

        units.append((weight, compute))
    stats, grad_norm = optimizer_step(run, units)
    return stats.finish(grad_norm_value(grad_norm), tokens, time.perf_counter() - started)
