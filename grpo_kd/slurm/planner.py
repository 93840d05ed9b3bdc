"""`grpo-kd plan`: the preflight of a chain, on paper, before a job queues for hours.

    report = make_plan(cfg, config_path)        # rules, models, vocabularies, shards and GPUs, memory, time
    report.problems                             # one line each; `plan` exits 1 when there is one

Key design choice: every answer comes from files, never from loading weights, so a 70B plan is checked on a laptop.
The models are found where a phase would find them — a local directory, or a hub id in the local hub cache — and
otherwise from the architecture facts shipped under `configs/models/<org>--<name>.json` (config.json fields
only); a model found nowhere is reported as unresolved rather than guessed. Checked, in order:

    rules        every rule of `grpo_kd.config.rules` (all of them listed, not only the first)
    models       each model is found; LoRA targets exist in the student's text decoder (built on the meta device)
    vocabulary   the tokenizers compared where both are readable, else the config vocabulary sizes: a teacher with
                 another vocabulary needs teacher.cross_tokenizer
    resources    shard counts agree (teacher tasks <= rollout shards <= prompts), and each phase's GPUs are the ones
                 it uses; vLLM's model-dependent refusals
    memory       `grpo_kd.slurm.memory` per phase and GPU against slurm.gpu_memory_gb
    time         tokens and FLOPs per iteration, hours at slurm.gpu_tflops x PLAN_MFU
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpo_kd
from grpo_kd.arch import ArchFacts, arch_facts
from grpo_kd.config import Config, problems
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import resolve_source
from grpo_kd.slurm.memory import GIB, PhaseMemory, phase_memory

PLAN_MFU = 0.4  # the share of the GPU's peak the time estimate assumes (decoding is slower: memory-bound)
MODELS_DIR = "models"  # beside the shipped configs: configs/models/<org>--<name>.json


@dataclass
class ModelInfo:
    """What the plan knows of one model without loading it."""

    role: str  # "student" | "teacher"
    name: str  # model.path / teacher.path
    source: str = "unresolved"  # "local directory" | "hub cache" | "shipped facts <file>" | "unresolved"
    config: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None  # grpo_kd.models.tokenizer_fingerprint, where a tokenizer is readable
    facts: ArchFacts | None = None


@dataclass
class PlanReport:
    models: list[ModelInfo]
    phases: list[PhaseMemory]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    work: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> tokens, flops, hours


# ---------------------------------------------------------------------------------------------- models


def facts_dirs(config_path: Path | None) -> list[Path]:
    """Where shipped architecture facts are looked up: beside the config file, then in the repository's configs."""
    dirs = [config_path.parent / MODELS_DIR] if config_path is not None else []
    return dirs + [Path(grpo_kd.__file__).resolve().parents[1] / "configs" / MODELS_DIR]


def resolve_model(role: str, name: str, trust_remote_code: bool, config_path: Path | None) -> ModelInfo:
    """A model's config (and tokenizer fingerprint where one is readable) from a local directory, the hub cache,
    or the shipped facts; `source` says which, or "unresolved"."""
    info = ModelInfo(role, name)
    local = Path(name).expanduser()
    if local.is_dir():
        info.source, info.config = "local directory", _read_json(local / "config.json")
        info.tokenizer = _fingerprint(str(local), trust_remote_code)
    else:
        cached = _hub_cached_config(name)
        if cached is not None:
            info.source, info.config = "hub cache", _read_json(cached)
            info.tokenizer = _fingerprint(name, trust_remote_code, local_only=True)
        else:
            shipped = next((d / f"{name.replace('/', '--')}.json" for d in facts_dirs(config_path)
                            if (d / f"{name.replace('/', '--')}.json").is_file()), None)
            if shipped is not None:
                info.source, info.config = f"shipped facts {shipped.name}", _read_json(shipped)
    if info.config is not None:
        info.config = {k: v for k, v in info.config.items() if not k.startswith("_")}
        info.facts = arch_facts(info.config)
    return info


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _hub_cached_config(name: str) -> str | None:
    """The config.json of hub id `name` in the local hub cache, if a download left it there (no network)."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id: not a hub model
        return None
    return found if isinstance(found, str) else None


def _fingerprint(source: str, trust_remote_code: bool, *, local_only: bool = False) -> dict[str, Any] | None:
    """The tokenizer fingerprint, or None when no tokenizer can be read here (no files, no network)."""
    from transformers import AutoTokenizer

    from grpo_kd.models import tokenizer_fingerprint

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer_fingerprint(tokenizer)


def lora_problem(info: ModelInfo, targets: list[str]) -> str | None:
    """The one-line refusal when none of `targets` is a linear layer of the student's text decoder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_kd.lora import lora_targets  # imports torch and transformers' model classes: only with LoRA

    config = AutoConfig.for_model(**info.config)
    with torch.device("meta"):  # the modules without memory: a 70B model builds in a second
        model = AutoModelForCausalLM.from_config(config)
    try:
        lora_targets(model, targets)
    except GrpoKdError as exc:
        return f"model.lora_target_modules: {exc} ({info.name})"
    return None


# ---------------------------------------------------------------------------------------------- checks


def vocabulary_problems(cfg: Config, student: ModelInfo, teacher: ModelInfo | None) -> tuple[list[str], list[str]]:
    """(problems, notes) of the two vocabularies; a teacher with another one needs teacher.cross_tokenizer."""
    from grpo_kd.cache.manifest import describe_vocab, same_vocab

    if teacher is None:
        return [], []
    if student.tokenizer and teacher.tokenizer:
        same = same_vocab(student.tokenizer, teacher.tokenizer)
        how = f"{describe_vocab(teacher.tokenizer)} against the student's {describe_vocab(student.tokenizer)}"
    elif student.facts and teacher.facts:
        same = None if student.facts.vocab_size == teacher.facts.vocab_size else False
        how = (f"{teacher.facts.vocab_size} embedding rows against the student's {student.facts.vocab_size} "
               "(config.json; the tokenizers are not here to compare)")
    else:
        return [], ["vocabularies not compared: a model is unresolved"]
    if same is None:
        return [], [f"vocabularies: the same size, not compared token by token ({how})"]
    if not same and not cfg.teacher.cross_tokenizer:
        return [f"the teacher {teacher.name} has another vocabulary ({how}): set teacher.cross_tokenizer=true "
                "(sequence- and byte-level teacher signal), or use a teacher with the student's tokenizer"], []
    if not same and cfg.rollout.teacher_mix_alpha > 0:
        return ["rollout.teacher_mix_alpha > 0 needs the student's vocabulary in the teacher: teacher-mixed "
                f"sampling draws tokens from both ({how})"], []
    return [], [f"vocabularies: {'the same' if same else 'different, with teacher.cross_tokenizer'}"]


def resource_problems(cfg: Config) -> list[str]:
    """Shard counts and the GPUs each phase asks for against what it uses."""
    out = []
    r, t, s = cfg.rollout, cfg.teacher, cfg.slurm
    if t.num_shards > r.num_shards:
        out.append(f"teacher.num_shards={t.num_shards} tasks for rollout.num_shards={r.num_shards} shards: tasks "
                   f"{r.num_shards}..{t.num_shards - 1} of the cache-teacher array would have nothing to score")
    if r.num_shards > r.prompts_per_iteration:
        out.append(f"rollout.num_shards={r.num_shards} is more than rollout.prompts_per_iteration="
                   f"{r.prompts_per_iteration}: some shards would hold no group")
    rollout_gpus = s.rollout.nodes * s.rollout.gpus_per_node
    if r.engine == "hf" and rollout_gpus > 1 and not (r.teacher_mix_alpha > 0 and t.device_map):
        out.append(f"slurm.rollout asks for {rollout_gpus} GPUs but rollout.engine=hf samples on one: set "
                   "slurm.rollout.gpus_per_node=1, or rollout.engine=vllm (tensor parallelism)")
    teacher_gpus = s.cache_teacher.nodes * s.cache_teacher.gpus_per_node
    if s.cache_teacher.nodes > 1:
        out.append(f"slurm.cache_teacher.nodes={s.cache_teacher.nodes}: a teacher pass runs on one node "
                   "(device_map or tensor parallelism across its GPUs); use more array tasks instead")
    elif teacher_gpus > 1 and t.engine == "hf" and not t.device_map:
        out.append(f"slurm.cache_teacher asks for {teacher_gpus} GPUs per task but teacher.device_map is unset, "
                   "so the teacher runs on one: set teacher.device_map=auto or slurm.cache_teacher.gpus_per_node=1")
    return out


def memory_problems(phases: list[PhaseMemory], cfg: Config) -> list[str]:
    out = []
    for mem in phases:
        if not mem.fits:
            biggest = max(mem.parts, key=mem.parts.get)
            out.append(f"{mem.phase} does not fit: {mem.total / GIB:.1f} GiB per GPU > slurm.gpu_memory_gb="
                       f"{cfg.slurm.gpu_memory_gb:g} (largest part: {biggest}, {mem.parts[biggest] / GIB:.1f} GiB); "
                       f"{_fix_hint(mem, cfg)}")
    return out


def _fix_hint(mem: PhaseMemory, cfg: Config) -> str:
    if mem.phase == "cache-teacher":
        return ("spread the teacher over a node's GPUs (teacher.device_map=auto, or teacher.engine=vllm, with "
                "slurm.cache_teacher.gpus_per_node), or load it in 4-bit (teacher.load_in_4bit)")
    if mem.phase == "update":
        return ("use LoRA (model.lora), FSDP over more GPUs (optim.data_parallel=fsdp, slurm.update.gpus_per_node), "
                "gradient checkpointing, or a smaller optim.micro_batch_size")
    return "lower rollout.batch_size, or load the mixing teacher in 4-bit or over more GPUs"


# ---------------------------------------------------------------------------------------------- work


def iteration_work(cfg: Config, student: ArchFacts | None, teacher: ArchFacts | None) -> dict[str, dict[str, float]]:
    """Tokens and FLOPs of one iteration per phase (2 P per token forward, 6 P per token trained), and hours at
    slurm.gpu_tflops x PLAN_MFU on the phase's GPUs (teacher tasks run side by side)."""
    if student is None:
        return {}
    r, s = cfg.rollout, cfg.slurm
    rows = r.prompts_per_iteration * r.group_size
    sequence = cfg.data.max_prompt_tokens + r.max_new_tokens
    p_student = student.text_parameters
    p_teacher = teacher.text_parameters if (teacher and cfg.teacher.kind == "model") else p_student
    work = {
        "rollout": (rows * r.max_new_tokens, 2 * p_student * rows * (r.max_new_tokens + sequence)),
        "cache-teacher": (rows * sequence, 2 * (p_teacher + (p_student if cfg.teacher.reference else 0)) * rows
                          * sequence),
        "update": (rows * sequence * cfg.optim.epochs_per_iteration,
                   6 * p_student * rows * sequence * cfg.optim.epochs_per_iteration),
    }
    out = {}
    for phase, (tokens, flops) in work.items():
        job = getattr(s, phase.replace("-", "_"))
        gpus = max(1, job.nodes * job.gpus_per_node) * (cfg.teacher.num_shards if phase == "cache-teacher" else 1)
        hours = flops / (gpus * s.gpu_tflops * 1e12 * PLAN_MFU) / 3600
        out[phase] = {"tokens": tokens, "flops": flops, "gpus": gpus, "hours": hours}
    return out


# ---------------------------------------------------------------------------------------------- the plan


def make_plan(cfg: Config, config_path: Path | None = None) -> PlanReport:
    """Everything `grpo-kd plan` reports; see the module doc."""
    found = problems(cfg)
    student = resolve_model("student", cfg.model.path, cfg.model.trust_remote_code, config_path)
    teacher = (resolve_model("teacher", cfg.teacher.path, cfg.teacher.trust_remote_code, config_path)
               if cfg.teacher.kind == "model" else None)
    models = [student] + ([teacher] if teacher else [])
    notes = []
    for info in models:
        if info.facts is not None:
            continue
        try:
            resolve_source(info.name, info.role)  # a local path that is not there: one line, a problem
        except GrpoKdError as exc:
            found.append(str(exc))
            continue
        notes.append(f"{info.role} {info.name}: a hub id not in this machine's hub cache and without "
                     f"configs/{MODELS_DIR}/{info.name.replace('/', '--')}.json; its memory is not estimated")
    if cfg.model.lora and student.config is not None:
        problem = lora_problem(student, cfg.model.lora_target_modules)
        found += [problem] if problem else []
    vocab_found, vocab_notes = vocabulary_problems(cfg, student, teacher)
    found += vocab_found + resource_problems(cfg)
    notes += vocab_notes
    phases: list[PhaseMemory] = []
    if student.facts is not None and (teacher is None or teacher.facts is not None):
        phases = phase_memory(cfg, student.facts, teacher.facts if teacher else None)
        found += memory_problems(phases, cfg)
    work = iteration_work(cfg, student.facts, teacher.facts if teacher else None)
    return PlanReport(models, phases, found, notes, work)


def fmt_bytes(value: float) -> str:
    return f"{value / GIB:,.1f} GiB"


def fmt_count(value: float) -> str:
    if value <= 0:
        return "0"
    exponent = int(math.floor(math.log10(value) / 3)) if value >= 1000 else 0
    unit = ["", "k", "M", "G", "T", "P", "E"][min(exponent, 6)]
    return f"{value / 1000 ** min(exponent, 6):,.3g}{unit}"
