"""Every rule on the values of a config: ranges of single settings and the rules that relate settings.

    check(cfg)          # raises ConfigError with one line naming the dotted key(s) of the first problem
    problems(cfg)       # every problem, one line each (for a preflight that lists them all)

`load_config` calls `check`, so `config validate`, every phase, `grpo-kd run` and `chain submit` share one
answer; `run_phase` calls it again for configs built or changed in code. Key design choice: these rules read
the config and nothing else, so they are cheap and run before any work. Rules that need files (paths that must
exist, text that must decode, vocabularies that must match) are in `grpo_kd.train.preflight`, which runs them
when a phase or `grpo-kd run` starts, before any work.

One function per section of the config, each a generator of problem lines, listed in `SECTIONS`; a new rule goes
into the function of the section whose setting it constrains (a cross-field rule: the section of the setting
the message tells the user to change). The helpers say the range once, so every message reads alike:
"optim.lr must be > 0, got -0.001".
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Callable, Iterator

from grpo_kd.config.schema import REWARD_COMPONENTS, Config, ConfigError

Problems = Iterator[str]

# ---------------------------------------------------------------------------------------------- helpers


def _at_least(key: str, value: float | None, low: float) -> Problems:
    if value is not None and not value >= low:
        yield f"{key} must be at least {low:g}, got {value}"


def _positive(key: str, value: float | None) -> Problems:
    if value is not None and not value > 0:
        yield f"{key} must be > 0, got {value}"


def _within(key: str, value: float | None, low: float, high: float, *, open_low: bool = False,
            open_high: bool = False) -> Problems:
    if value is None:
        return
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        yield f"{key} must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}, got {value}"


def _finite(key: str, value: float | None) -> Problems:
    if value is not None and not math.isfinite(value):
        yield f"{key} must be a finite number, got {value}"


# ---------------------------------------------------------------------------------------------- sections


def _run(cfg: Config) -> Problems:
    name = cfg.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or PurePath(name).name != name:
        yield (f"name must be one directory name inside output_dir (no '/', not '.' or '..'), got {name!r}: the "
               "run directory is output_dir/name")
    if not cfg.output_dir:
        yield "output_dir must not be empty (use '.' for the current directory)"
    yield from _at_least("iterations", cfg.iterations, 1)


def _model(cfg: Config) -> Problems:
    m = cfg.model
    if not m.path:
        yield "model.path must name the student (a model directory or a hub id)"
    if m.lora:
        yield from _at_least("model.lora_r", m.lora_r, 1)
        yield from _positive("model.lora_alpha", m.lora_alpha)
        yield from _within("model.lora_dropout", m.lora_dropout, 0, 1, open_high=True)
        if not m.lora_target_modules:
            yield "model.lora=true needs model.lora_target_modules (the linear layers to adapt)"
    if m.load_in_4bit and not m.lora:
        yield "model.load_in_4bit trains LoRA adapters on a frozen 4-bit base (QLoRA): set model.lora=true"


def _data(cfg: Config) -> Problems:
    d = cfg.data
    yield from _at_least("data.max_prompts", d.max_prompts, 1)
    yield from _at_least("data.max_prompt_tokens", d.max_prompt_tokens, 1)
    yield from _within("data.heldout_fraction", d.heldout_fraction, 0, 1, open_high=True)
    yield from _at_least("data.prefix_words", d.prefix_words, 0)


def _rollout(cfg: Config) -> Problems:
    r = cfg.rollout
    for name in ("prompts_per_iteration", "group_size", "max_new_tokens", "batch_size", "num_shards"):
        yield from _at_least(f"rollout.{name}", getattr(r, name), 1)
    if cfg.loss.algorithm in ("grpo", "self_distill") and r.group_size == 1:
        yield (f"loss.algorithm={cfg.loss.algorithm} needs rollout.group_size >= 2: its advantages are relative "
               "to the other completions of the group, so a group of 1 gives a zero gradient at every step")
    yield from _positive("rollout.temperature", r.temperature)
    yield from _within("rollout.top_p", r.top_p, 0, 1, open_low=True)
    yield from _at_least("rollout.top_k (0 = off)", r.top_k, 0)
    yield from _within("rollout.teacher_mix_alpha", r.teacher_mix_alpha, 0, 1)
    if r.teacher_mix_alpha > 0 and cfg.teacher.kind == "self_privileged":
        yield ("rollout.teacher_mix_alpha > 0 is not supported with teacher.kind=self_privileged (the teacher "
               "would need another prompt); use teacher.kind model or self_base")
    if r.teacher_mix_alpha > 0 and r.recompute_logprobs is False:
        yield ("rollout.recompute_logprobs=false is not available with rollout.teacher_mix_alpha > 0: the mixture's "
               "and the student's log-probs are both recorded by the recompute")


def _teacher(cfg: Config) -> Problems:
    t = cfg.teacher
    if t.kind == "model" and not t.path:
        yield "teacher.path must name the teacher model when teacher.kind=model"
    yield from _at_least("teacher.top_k", t.top_k, 1)
    yield from _at_least("teacher.num_samples", t.num_samples, 0)
    yield from _positive("teacher.temperature", t.temperature)
    yield from _positive("teacher.softcap (null: the model's own)", t.softcap)
    yield from _at_least("teacher.token_budget", t.token_budget, 1)
    yield from _at_least("teacher.num_shards", t.num_shards, 1)
    r = cfg.rollout
    if t.num_shards > r.num_shards >= 1:  # task i scores rollout shards i, i + tasks, ... (slurm/plan.py)
        yield (f"teacher.num_shards={t.num_shards} is more than rollout.num_shards={r.num_shards}: cache-teacher "
               f"tasks {r.num_shards}..{t.num_shards - 1} would have no rollout shard to score; set "
               f"teacher.num_shards <= rollout.num_shards")
    if r.num_shards > r.prompts_per_iteration >= 1:
        yield (f"rollout.num_shards={r.num_shards} is more than rollout.prompts_per_iteration="
               f"{r.prompts_per_iteration}: some rollout shards would hold no prompt")


def _loss(cfg: Config) -> Problems:
    loss, sections = cfg.loss, cfg.loss.sections
    if "policy" in sections:
        yield from _at_least("loss.policy.beta", loss.policy.beta, 0)
        yield from _within("loss.policy.epsilon_low", loss.policy.epsilon_low, 0, 1, open_high=True)
        yield from _at_least("loss.policy.epsilon_high", loss.policy.epsilon_high, 0)
    if "reward" in sections:
        yield from _reward(cfg)
    if "ppo" in sections:
        yield from _within("loss.ppo.gamma", loss.ppo.gamma, 0, 1)
        yield from _within("loss.ppo.gae_lambda", loss.ppo.gae_lambda, 0, 1)
        yield from _at_least("loss.ppo.value_coef", loss.ppo.value_coef, 0)
    if "minillm" in sections:
        yield from _within("loss.minillm.gamma", loss.minillm.gamma, 0, 1)
        yield from _at_least("loss.minillm.importance_clip", loss.minillm.importance_clip, 0)
    if "teacher_kl" in sections:
        yield from _teacher_kl(cfg)
    yield from _at_least("loss.pt.weight", loss.pt.weight, 0)
    yield from _at_least("loss.pt.batch_size", loss.pt.batch_size, 1)
    yield from _at_least("loss.pt.seq_len", loss.pt.seq_len, 2)
    if loss.pt.weight > 0 and not cfg.data.pretrain_text:
        yield "loss.pt.weight > 0 needs data.pretrain_text (a source of pre-training text)"


def _reward(cfg: Config) -> Problems:
    weights = cfg.loss.reward.weights
    unknown = sorted(set(weights) - set(REWARD_COMPONENTS))
    if unknown:
        yield (f"loss.reward.weights: unknown reward component(s) {', '.join(unknown)}; known: "
               f"{', '.join(REWARD_COMPONENTS)}")
    for name, weight in weights.items():
        yield from _finite(f"loss.reward.weights.{name}", weight)
    if weights and not any(weights.values()):
        yield "loss.reward.weights: every weight is zero, so there is nothing to learn from"


def _teacher_kl(cfg: Config) -> Problems:
    kl = cfg.loss.teacher_kl
    yield from _within("loss.teacher_kl.jsd_beta", kl.jsd_beta, 0, 1)
    if kl.estimate == "sampled":
        if cfg.teacher.num_samples < 1:
            yield ("loss.teacher_kl.estimate=sampled needs teacher.num_samples > 0 (the tokens the cache samples from "
                   "the teacher), got 0")
        if kl.divergence != "forward":
            yield (f"loss.teacher_kl.estimate=sampled estimates the forward KL only (teacher samples give no unbiased "
                   f"{kl.divergence} KL); set loss.teacher_kl.divergence=forward or loss.teacher_kl.estimate=topk")


def _engines(cfg: Config) -> Problems:
    """What vLLM cannot do, from the config alone (the model-dependent rules are in
    `grpo_kd.engines.vllm_engine.preflight`, run before any phase)."""
    t = cfg.teacher
    if cfg.rollout.engine == "vllm" and cfg.rollout.teacher_mix_alpha > 0:
        yield ("rollout.engine=vllm cannot do teacher-mixed sampling (rollout.teacher_mix_alpha > 0 needs the teacher "
               "at every step); use rollout.engine=hf or teacher_mix_alpha=0")
    if t.engine == "vllm":
        for bad, what in [(t.num_samples > 0, "teacher.num_samples > 0 (sampling needs the full distribution; vLLM "
                                              "gives the top-k)"),
                          (t.temperature != 1.0, f"teacher.temperature={t.temperature} (vLLM's prompt log-probs are "
                                                 "of the untempered logits)"),
                          (t.load_in_4bit, "teacher.load_in_4bit (bitsandbytes through transformers)"),
                          (t.device_map is not None, "teacher.device_map (vLLM spreads a teacher with "
                                                     "vllm.tensor_parallel_size)")]:
            if bad:
                yield f"teacher.engine=vllm cannot serve {what}; use teacher.engine=hf"
    if "policy" in cfg.loss.sections:
        yield from _at_least("loss.policy.tis_cap (0 = off)", cfg.loss.policy.tis_cap, 0)
    if cfg.vllm.gpu_memory_utilization is not None:
        yield from _within("vllm.gpu_memory_utilization", cfg.vllm.gpu_memory_utilization, 0, 1, open_low=True)
    yield from _at_least("vllm.tensor_parallel_size (0 = every GPU of the job)", cfg.vllm.tensor_parallel_size, 0)
    yield from _at_least("vllm.max_num_seqs", cfg.vllm.max_num_seqs, 1)


def _sft(cfg: Config) -> Problems:
    """What phase 0 (sft) cannot run with."""
    s, d = cfg.sft, cfg.data
    yield from _at_least("sft.epochs", s.epochs, 1)
    yield from _at_least("sft.max_steps (0: every epoch)", s.max_steps, 0)
    if s.plain_text and not s.source:
        yield "sft.plain_text needs sft.source (a text, CoNLL-U, JSONL or Parquet file, or a dataset)"
    if s.enabled and not s.source and not (d.privileged_field or d.prefix_words > 0):
        yield ("sft.source is empty, so phase 0 trains on data.prompts with their continuation, which needs "
               "data.privileged_field or data.prefix_words; or set sft.source")


def _optim(cfg: Config) -> Problems:
    o = cfg.optim
    yield from _positive("optim.lr", o.lr)
    yield from _finite("optim.lr", o.lr)
    yield from _at_least("optim.weight_decay", o.weight_decay, 0)
    if len(o.betas) != 2:
        yield f"optim.betas must hold two numbers, got {o.betas}"
    for i, beta in enumerate(o.betas):
        yield from _within(f"optim.betas[{i}]", beta, 0, 1, open_high=True)
    yield from _at_least("optim.warmup_steps", o.warmup_steps, 0)
    yield from _positive("optim.max_grad_norm", o.max_grad_norm)
    yield from _at_least("optim.micro_batch_size", o.micro_batch_size, 1)
    yield from _at_least("optim.grad_accum", o.grad_accum, 1)
    yield from _at_least("optim.epochs_per_iteration", o.epochs_per_iteration, 1)
    rows = o.micro_batch_size * o.grad_accum
    group = cfg.rollout.group_size
    if rows >= 1 and group >= 1 and rows % group:
        yield (f"optim.micro_batch_size x optim.grad_accum = {rows} completions per rank and step must be a multiple "
               f"of rollout.group_size={group} (a step takes whole groups)")


def _checkpoint(cfg: Config) -> Problems:
    yield from _at_least("checkpoint.save_every_steps (0 = off)", cfg.checkpoint.save_every_steps, 0)
    yield from _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 0)


def _slurm(cfg: Config) -> Problems:
    s = cfg.slurm
    yield from _at_least("slurm.array_parallelism (0 = no throttle)", s.array_parallelism, 0)
    yield from _at_least("slurm.signal_seconds", s.signal_seconds, 0)
    yield from _within("slurm.rendezvous_port", s.rendezvous_port, 1, 65535)
    yield from _positive("slurm.gpu_memory_gb", s.gpu_memory_gb)
    yield from _positive("slurm.gpu_tflops", s.gpu_tflops)
    for phase in ("rollout", "cache_teacher", "update"):
        job = getattr(s, phase)
        yield from _at_least(f"slurm.{phase}.nodes", job.nodes, 1)
        yield from _at_least(f"slurm.{phase}.gpus_per_node", job.gpus_per_node, 0)
        yield from _at_least(f"slurm.{phase}.cpus_per_task", job.cpus_per_task, 1)
    yield from _phase_gpus(cfg)


def _phase_gpus(cfg: Config) -> Problems:
    """The GPUs each phase's job asks for against the GPUs the phase uses: one for an hf rollout (two models
    of a teacher-mixed one may spread with teacher.device_map), one node for a teacher pass, and more than one
    GPU per teacher task only when something spreads the teacher over them."""
    s, r, t = cfg.slurm, cfg.rollout, cfg.teacher
    rollout_gpus = s.rollout.nodes * s.rollout.gpus_per_node
    if r.engine == "hf" and rollout_gpus > 1 and not (r.teacher_mix_alpha > 0 and t.device_map):
        yield (f"slurm.rollout asks for {rollout_gpus} GPUs but rollout.engine=hf samples on one: set "
               "slurm.rollout.gpus_per_node=1, or rollout.engine=vllm (tensor parallelism)")
    if s.rollout.nodes > 1 or s.cache_teacher.nodes > 1:
        phase = "rollout" if s.rollout.nodes > 1 else "cache_teacher"
        yield (f"slurm.{phase}.nodes={getattr(s, phase).nodes}: this phase runs on one node (its GPUs through "
               "device_map or tensor parallelism); use more shards (array tasks) instead")
    teacher_gpus = s.cache_teacher.gpus_per_node
    if teacher_gpus > 1 and t.engine == "hf" and t.kind != "model":
        yield (f"slurm.cache_teacher asks for {teacher_gpus} GPUs per task but a self-teacher (teacher.kind="
               f"{t.kind}) with teacher.engine=hf runs on one: set slurm.cache_teacher.gpus_per_node=1")
    elif teacher_gpus > 1 and t.engine == "hf" and not t.device_map:
        yield (f"slurm.cache_teacher asks for {teacher_gpus} GPUs per task but teacher.engine=hf without "
               "teacher.device_map uses one: set teacher.device_map=auto or slurm.cache_teacher.gpus_per_node=1")


def _eval(cfg: Config) -> Problems:
    e = cfg.eval
    for name in ("max_examples", "max_new_tokens", "batch_size", "repetition_n", "prompt_words"):
        yield from _at_least(f"eval.{name}", getattr(e, name), 1)
    yield from _at_least("eval.foqa_shots", e.foqa_shots, 0)
    yield from _at_least("eval.max_tokens (the perplexity window)", e.max_tokens, 2)
    yield from _positive("eval.temperature", e.temperature)
    yield from _within("eval.collapse_ratio", e.collapse_ratio, 0, 1)
    yield from _at_least("eval.collapse_repetition_margin", e.collapse_repetition_margin, 0)


SECTIONS: tuple[Callable[[Config], Problems], ...] = (
    _run, _model, _data, _rollout, _teacher, _loss, _engines, _sft, _optim, _checkpoint, _slurm, _eval,
)


# ---------------------------------------------------------------------------------------------- entry points


def problems(cfg: Config) -> list[str]:
    """Every rule the config breaks, one line each, in the order of `SECTIONS`."""
    return [problem for section in SECTIONS for problem in section(cfg)]


def check(cfg: Config) -> None:
    """Raise `ConfigError` with the first problem of `problems(cfg)` (and how many more there are)."""
    found = problems(cfg)
    if found:
        more = f" (and {len(found) - 1} more: `grpo-kd config validate` lists them)" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)
