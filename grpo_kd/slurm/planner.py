"""`grpo-kd plan`: the preflight of a chain, on paper, before a job queues for hours.

    report = make_plan(cfg, config_path)        # rules, models, vocabularies, shards and GPUs, memory, time
    report.problems                             # one line each; `plan` exits 1 when there is one

Key design choice: every answer comes from files, never from loading weights, so a 70B plan is checked on a laptop.
The models are found where a phase would find them — a local directory, or a hub id in the local hub cache — and
otherwise from the architecture facts shipped under `configs/models/<org>--<name>.json` (config.json fields
only); a model found nowhere is reported as unresolved rather than guessed. Checked, in order:

    rules        every rule of `grpo_kd.config.rules` (all of them listed, not only the first), which include
                 the shard counts (teacher tasks <= rollout shards <= prompts) and the GPUs each phase uses
    models       each model is found; LoRA targets exist in the student's text decoder (built on the meta device)
    data         the prompt and pre-training files read and decoded, where they are on this machine
    vocabulary   the tokenizers compared where both are readable, else the config vocabulary sizes: what a teacher
                 with another vocabulary cannot serve (top-k losses, sampling mixed with it) is refused
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
from grpo_kd.models import check_model_source, load_tokenizer, resolve_source, tokenizer_fingerprint
from grpo_kd.slurm.memory import GIB, PhaseMemory, dtype_bytes, phase_memory

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
    error: str = ""  # why the facts could not be read from the config
    tokenizer_error: str = ""  # why a local model's tokenizer could not be loaded


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


def resolve_model(role: str, name: str, trust_remote_code: bool, config_path: Path | None,
                  tokenizer: str | None = None) -> ModelInfo:
    """A model's config (and tokenizer fingerprint where one is readable) from a local directory, the hub cache,
    or the shipped facts; `source` says which, or "unresolved"."""
    info = ModelInfo(role, name)
    local = Path(name).expanduser()
    if local.is_dir():
        info.source, info.config = "local directory", _read_json(local / "config.json")
        try:  # the tokenizer a phase would load
            loaded = load_tokenizer(tokenizer or name, trust_remote_code=trust_remote_code)
            info.tokenizer = tokenizer_fingerprint(loaded)
        except GrpoKdError as exc:
            info.tokenizer_error = str(exc)
    else:
        cached = _hub_cached_config(name)
        if cached is not None:
            info.source, info.config = "hub cache", _read_json(cached)
            info.tokenizer = _cached_fingerprint(name, trust_remote_code)
        else:
            shipped = next((d / f"{name.replace('/', '--')}.json" for d in facts_dirs(config_path)
                            if (d / f"{name.replace('/', '--')}.json").is_file()), None)
            if shipped is not None:
                info.source, info.config = f"shipped facts {shipped.name}", _read_json(shipped)
    if info.config is not None:
        info.config = {k: v for k, v in info.config.items() if not k.startswith("_")}
        try:
            info.facts = arch_facts(info.config)
        except GrpoKdError as exc:  # a family outside grpo_kd.arch: the plan goes on without its memory
            info.error = str(exc)
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


def _cached_fingerprint(source: str, trust_remote_code: bool) -> dict[str, Any] | None:
    """The tokenizer fingerprint of a hub id from the local hub cache, or None when it is not there."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer_fingerprint(tokenizer)


def lora_problem(info: ModelInfo, targets: list[str]) -> str | None:
    """The one-line refusal when none of `targets` is a linear layer of the student's text decoder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_kd.lora import lora_targets  # imports torch and transformers' model classes: only with LoRA

    try:
        config = AutoConfig.for_model(**info.config)
        with torch.device("meta"):  # the modules without memory: a 70B model builds in a second
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:  # a model type transformers cannot build from its config
        return f"model.lora_target_modules: {info.name} cannot be built to look for them: {str(exc).splitlines()[0]}"
    try:
        lora_targets(model, targets)
    except GrpoKdError as exc:
        return f"model.lora_target_modules: {exc} ({info.name})"
    return None


# ---------------------------------------------------------------------------------------------- checks


def data_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(problems, notes) of the prompt and pre-training files, read as the phases read them
    (`grpo_kd.train.preflight.check_data`); a local file that is not on this machine is a note, not a problem: a
    config for a cluster names the cluster's disks."""
    from grpo_kd.data import detect_format
    from grpo_kd.train.preflight import check_data, data_sources

    def absent(key: str, source: str) -> bool:  # a local file that is not here (a hub dataset is read later)
        if not source or Path(source).expanduser().exists():
            return False
        try:
            return detect_format(source, cfg.data.format if key == "data.prompts" else "auto") != "hf"
        except GrpoKdError:  # "data file not found"
            return True

    absent = [f"{key}={source}" for key, source in data_sources(cfg) if absent(key, source)]
    if absent:
        return [], [f"not on this machine, so not read: {', '.join(absent)} (the phases read them when they start)"]
    try:
        check_data(cfg)
    except GrpoKdError as exc:
        return [str(exc)], []
    return [], []


def vocabulary_problems(cfg: Config, student: ModelInfo, teacher: ModelInfo | None) -> tuple[list[str], list[str]]:
    """(problems, notes) of the two vocabularies: the phases' own rule (`grpo_kd.train.preflight.
    check_vocabularies`) where both tokenizers are readable, else the embedding rows of the two configs. A teacher
    with another vocabulary needs no setting (its log-probs are aligned onto the student's tokens); what it
    cannot serve (`grpo_kd.train.teacher_vocab.foreign_teacher_refusal`) is refused."""
    from grpo_kd.models import same_vocabulary
    from grpo_kd.train.preflight import check_vocabularies
    from grpo_kd.train.teacher_vocab import foreign_teacher_refusal

    if teacher is None:
        return [], []
    if student.tokenizer and teacher.tokenizer:
        try:
            check_vocabularies(cfg, student.tokenizer, teacher.tokenizer)
        except GrpoKdError as exc:
            return [str(exc)], []
        same = same_vocabulary(student.tokenizer, teacher.tokenizer)
        return [], [f"vocabularies: {'the same' if same else 'different: teacher log-probs aligned by bytes'} "
                    "(the tokenizers compared token by token)"]
    if not (student.facts and teacher.facts):
        return [], ["vocabularies not compared: a model is unresolved"]
    rows = (f"{teacher.facts.vocab_size} embedding rows against the student's {student.facts.vocab_size} "
            "(config.json; the tokenizers are not here to compare)")
    if student.facts.vocab_size == teacher.facts.vocab_size:
        return [], [f"vocabularies: the same size, not compared token by token ({rows})"]
    refusal = foreign_teacher_refusal(cfg)
    if refusal:
        return [f"the teacher {teacher.name} has another vocabulary ({rows}): {refusal}"], []
    return [], [f"vocabularies: different, teacher log-probs aligned onto the student's tokens by bytes ({rows})"]


def memory_problems(phases: list[PhaseMemory], cfg: Config) -> list[str]:
    out = []
    for mem in phases:
        if not mem.fits:
            biggest = max(mem.parts, key=mem.parts.get)
            whole = cfg.slurm.gpu_memory_gb * GIB
            share = f" x vLLM's share {mem.available / whole:.2f}" if mem.available < whole else ""
            out.append(f"{mem.phase} does not fit: {mem.total / GIB:.1f} GiB per GPU > {mem.available / GIB:.1f} "
                       f"GiB (slurm.gpu_memory_gb={cfg.slurm.gpu_memory_gb:g}{share}; largest part: {biggest}, "
                       f"{mem.parts[biggest] / GIB:.1f} GiB); {_fix_hint(mem, cfg)}")
    return out


def _fix_hint(mem: PhaseMemory, cfg: Config) -> str:
    """What to change, for the phase and what the config already does."""
    m, t = cfg.model, cfg.teacher
    four_bit = "" if m.load_in_4bit else "load the student's base in 4-bit (model.load_in_4bit with model.lora), "
    if mem.phase == "cache-teacher":
        if t.kind != "model":
            return f"{four_bit}or score with teacher.engine=vllm over slurm.cache_teacher.gpus_per_node GPUs"
        return ("spread the teacher over a node's GPUs (teacher.device_map=auto, or teacher.engine=vllm, with "
                "slurm.cache_teacher.gpus_per_node), or load it in 4-bit (teacher.load_in_4bit)")
    if mem.phase == "update":
        first = four_bit if m.lora else "use LoRA (model.lora), "
        return (f"{first}FSDP over more GPUs (optim.data_parallel=fsdp, slurm.update.gpus_per_node), gradient "
                "checkpointing (model.gradient_checkpointing), or a smaller optim.micro_batch_size")
    mixing = ", or load the mixing teacher in 4-bit or over more GPUs" if cfg.rollout.teacher_mix_alpha > 0 else ""
    return f"lower rollout.batch_size, {four_bit}or sample with rollout.engine=vllm over more GPUs{mixing}"


# ---------------------------------------------------------------------------------------------- work


def iteration_work(cfg: Config, student: ArchFacts | None, teacher: ArchFacts | None) -> dict[str, dict[str, float]]:
    """Tokens and FLOPs of one iteration per phase, 2 P per token and forward: the rollout's sampling (prompt
    and completion), the teacher pass (teacher and reference over prompt and completion), the update's forward
    and backward (6 P per token trained in full, 4 P with LoRA: no weight gradients of the frozen base); and
    hours at slurm.gpu_tflops x PLAN_MFU on the phase's GPUs (teacher tasks run side by side). Empty when a
    model is unresolved."""
    if student is None or (cfg.teacher.kind == "model" and teacher is None):
        return {}
    r, s = cfg.rollout, cfg.slurm
    rows = r.prompts_per_iteration * r.group_size
    sequence = cfg.data.max_prompt_tokens + r.max_new_tokens
    p_student = student.text_parameters
    p_teacher = teacher.text_parameters if cfg.teacher.kind == "model" else p_student
    trained = (4 if cfg.model.lora else 6) * p_student
    work = {
        "rollout": (rows * r.max_new_tokens, 2 * p_student * rows * sequence),
        "cache-teacher": (rows * sequence, 2 * (p_teacher + (p_student if cfg.teacher.reference else 0)) * rows
                          * sequence),
        "update": (rows * sequence * cfg.optim.epochs_per_iteration,
                   trained * rows * sequence * cfg.optim.epochs_per_iteration),
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
    student = resolve_model("student", cfg.model.path, cfg.model.trust_remote_code, config_path, cfg.model.tokenizer)
    teacher = (resolve_model("teacher", cfg.teacher.path, cfg.teacher.trust_remote_code, config_path)
               if cfg.teacher.kind == "model" else None)
    models = [student] + ([teacher] if teacher else [])
    notes = []
    for info in models:
        try:
            if info.source == "local directory":  # what the phase's loader needs: config.json and safetensors
                check_model_source(info.name, info.role, verify=False)
                if info.tokenizer_error:
                    found.append(f"{info.role} {info.name}: {info.tokenizer_error}")
            elif info.config is None:
                resolve_source(info.name, info.role)  # a local path that is not there: one line, a problem
                notes.append(f"{info.role} {info.name}: unresolved: a hub id not in this machine's hub cache and "
                             f"without configs/{MODELS_DIR}/{info.name.replace('/', '--')}.json; its memory is not "
                             "estimated")
        except GrpoKdError as exc:
            found.append(str(exc))
        if info.config is not None and info.facts is None:
            notes.append(f"{info.role} {info.name}: memory not estimated: {info.error}")
    if cfg.model.lora and student.config is not None:
        problem = lora_problem(student, cfg.model.lora_target_modules)
        found += [problem] if problem else []
    for more_found, more_notes in (data_problems(cfg), vocabulary_problems(cfg, student, teacher)):
        found += more_found
        notes += more_notes
    phases: list[PhaseMemory] = []
    if student.facts is not None and (teacher is None or teacher.facts is not None):
        phases = phase_memory(cfg, student.facts, teacher.facts if teacher else None)
        found += memory_problems(phases, cfg)
    if not cfg.model.lora and dtype_bytes(cfg.model.dtype) == 2:
        notes.append(f"full fine-tuning in 16 bits (model.dtype={cfg.model.dtype}): the optimizer always keeps "
                     "float32 master weights and moments (grpo_kd/train/optim.py); there is no setting without them")
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
