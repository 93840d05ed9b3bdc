"""The run configuration: small nested dataclasses, loaded from YAML with dotted overrides.

Each default lives here and nowhere else: the command line, the SLURM scripts and the phases read a resolved
`Config`, never their own fallbacks. Validation is driven by the type annotations, so a field is declared once.
An unknown key or a value of the wrong type raises `ConfigError` with one line that names the dotted key and, for
a typo, the nearest valid key.

    cfg = load_config("configs/grpo.yaml", ["loss.beta=0.04", "rollout.group_size=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from grpo_kd.errors import GrpoKdError


class ConfigError(GrpoKdError):
    """A config file or override that does not match the schema."""


@dataclass
class ModelConfig:
    """The student: any causal LM from a local directory or a hub id."""

    path: str = "runs/tiny-models/student"  # local directory or hub id
    tokenizer: str | None = None  # defaults to `path`
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # QLoRA: a frozen NF4 base (bitsandbytes, GPU or CPU) under LoRA adapters
    lora: bool = False  # train LoRA adapters instead of the full model
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class DataConfig:
    """Where prompts, held-out prompts and pre-training text come from."""

    prompts: str = ""  # JSONL, Parquet, text, CoNLL-U, a saved HF dataset, or a hub dataset name
    format: Literal["auto", "jsonl", "parquet", "text", "conllu", "hf"] = "auto"
    split: str = "train"
    prompt_field: str = "prompt"
    privileged_field: str | None = None  # answer / demonstration for the privileged self-teacher
    chat_template: bool = False  # render prompts through the tokenizer's chat template
    max_prompts: int | None = None
    max_prompt_tokens: int = 256  # longer prompts are truncated from the left
    heldout_prompts: str | None = None  # for evaluation; defaults to a slice held out of `prompts`
    heldout_fraction: float = 0.1
    pretrain_text: str | None = None  # source of the L_PT language-modelling batches
    text_field: str = "text"  # field of pretrain / held-out text in JSONL, Parquet or HF sources
    prefix_words: int = 0  # text / CoNLL-U: prompt = first N words, privileged = the rest; 0 = whole line


@dataclass
class RolloutConfig:
    """How the student samples its groups of completions."""

    prompts_per_iteration: int = 64
    group_size: int = 4  # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    batch_size: int = 16  # prompts per generation batch
    teacher_mix_alpha: float = 0.0  # MiniLLM: draw from alpha * p_teacher + (1 - alpha) * q_student
    num_shards: int = 1
    # old_logprobs from one full forward after sampling (the update's own computation); false: the sampling loop's
    # own values (equal up to float rounding in float32, saves that forward; not with teacher mixing)
    recompute_logprobs: bool = True


@dataclass
class TeacherConfig:
    """Who scores the rollouts, and what the cache keeps of it."""

    kind: Literal["model", "self_base", "self_privileged"] = "model"
    path: str = "runs/tiny-models/teacher"  # ignored for the self-teachers, which use the student
    adapter: bool = False  # self-teachers: the current student (its checkpoint) if True, else its initial model
    prompt_template: str = "{privileged}\n\n{prompt}"  # self_privileged: how the privileged info is placed
    # the teacher's prompt through its own tokenizer's chat template (its format, not the student's); None: as
    # data.chat_template. The completion is the student's either way.
    chat_template: bool | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = False
    device_map: str | None = None  # "auto" spreads a large teacher over the GPUs of a node
    trust_remote_code: bool = False
    top_k: int = 64  # k: teacher log-probs kept per token
    num_samples: int = 0  # m: tokens sampled from the teacher per position (unbiased sparse estimate)
    temperature: float = 1.0
    softcap: float | None = None  # None: read final_logit_softcapping from the model config
    cache_format: Literal["arrow", "zarr"] = "arrow"
    logprob_dtype: Literal["float16", "bfloat16"] = "float16"
    token_budget: int = 8192  # tokens per teacher forward batch
    num_shards: int = 1  # cache-teacher array size
    reference: bool = True  # also store the reference model's per-token log-probs (KL penalty)
    cross_tokenizer_norm: Literal["token", "byte"] = "token"
    cross_tokenizer: bool = False  # teacher with another vocabulary: cache sequence scores only (else refuse)


@dataclass
class LossConfig:
    """The algorithm and its objective. Reward components are named and weighted separately."""

    algorithm: Literal["grpo", "ppo", "minillm", "self_distill", "privileged"] = "grpo"
    reward: Literal["teacher_loglik", "minillm"] = "teacher_loglik"
    # {} = the default of the algorithm: {teacher_loglik: 1} (reward teacher_loglik), {log_ratio: 1} (reward minillm),
    # {inverse_loss: 1} (self_distill); see grpo_kd.train.algorithms.common.reward_weights
    reward_weights: dict[str, float] = field(default_factory=dict)
    beta: float = 0.04  # KL-to-reference coefficient (k3 estimator)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: bool = True  # divide group-relative advantages by the group's std
    divergence: Literal["forward", "reverse", "jsd"] = "reverse"
    jsd_beta: float = 0.5
    tail: Literal["bucket", "renorm", "uniform"] = "bucket"
    # teacher KL of minillm / privileged: over the cached top-k ("topk"), or the unbiased forward-KL estimate from
    # the cached samples ("sampled": needs teacher.num_samples > 0 and divergence "forward"; tail is ignored)
    teacher_estimate: Literal["topk", "sampled"] = "topk"
    pt_weight: float = 0.0  # weight of the language-modelling loss L_PT
    gamma: float = 1.0  # PPO / MiniLLM discount
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    importance_clip: float = 0.2  # MiniLLM: clip of the teacher-mixed importance weights
    length_normalize: bool = True  # MiniLLM: R^Norm
    pt_batch_size: int = 8  # L_PT: pre-training sequences per optimizer step (over all ranks)
    pt_seq_len: int = 256  # L_PT: tokens per pre-training sequence


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8  # sequences per forward/backward
    grad_accum: int = 1
    epochs_per_iteration: int = 1
    data_parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp: FSDP2, see grpo_kd.train.fsdp
    impl: Literal["auto", "triton", "torch"] = "auto"  # the fused kernels' implementation


@dataclass
class CheckpointConfig:
    save_every_steps: int = 0  # 0: only at the end of a phase and on a signal
    keep_last: int = 2
    save_optimizer: bool = True


@dataclass
class SlurmPhaseConfig:
    """Resources of one phase's sbatch job."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem: str = "64G"
    time: str = "02:00:00"
    partition: str | None = None  # overrides SlurmConfig.partition


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 0  # `%p` on the cache-teacher array; 0 = no throttle
    signal_seconds: int = 300  # USR2 this long before the time limit, to checkpoint and requeue
    setup: list[str] = field(default_factory=list)  # shell lines before the phase (module load, venv)
    requeue: bool = True  # --requeue, and requeue a phase that checkpointed on the pre-timeout signal
    bin_dir: str | None = None  # where grpo-kd and torchrun live; None: the bin dir of the Python that submits
    workdir: str | None = None  # the jobs' working directory; None: where `chain submit` runs (saved resolved)
    rendezvous_port: int = 29500  # torchrun c10d rendezvous port on the first node (multi-node update)
    sbatch_args: list[str] = field(default_factory=list)  # extra sbatch options for every job, e.g. --constraint=a100
    rollout: SlurmPhaseConfig = field(default_factory=SlurmPhaseConfig)
    cache_teacher: SlurmPhaseConfig = field(default_factory=SlurmPhaseConfig)
    update: SlurmPhaseConfig = field(default_factory=SlurmPhaseConfig)


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=lambda: ["perplexity", "distill", "diversity"])
    foqa: str | None = None  # local FoQA file, or "alexandrainst/foqa" where the hub is reachable
    foqa_shots: int = 2
    heldout_text: str | None = None  # perplexity text
    max_examples: int = 200
    max_new_tokens: int = 32
    batch_size: int = 8
    foqa_split: str = "validation"  # split evaluated of a hub or saved dataset (few-shot examples: "train")
    foqa_train: str | None = None  # few-shot source for a local FoQA file; None: its first examples (held out)
    language: str = "fo"  # QA answer normalisation: "fo" removes no articles, "en" removes a/an/the
    prompt_words: int = 4  # prompts from heldout_text: its sentences' first N words
    temperature: float = 1.0  # sampling temperature of the distill / diversity completions
    max_tokens: int = 1024  # perplexity window (tokens); longer texts are scored window by window
    repetition_n: int = 4  # n of the within-text repetition rate
    collapse_ratio: float = 0.5  # warn when distinct-n < ratio x the baseline's
    collapse_repetition_margin: float = 0.25  # warn when repetition rate > the baseline's + margin
    distill_cross_tokenizer: bool = False  # different vocabularies: report the teacher score only, no KL
    euroeval_language: str = "fo"
    euroeval_args: list[str] = field(default_factory=list)  # extra EuroEval CLI args, e.g. ["--num-iterations", "1"]


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 0
    iterations: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `key.sub=value` overrides, validated as one mapping."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return from_dict(Config, raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`loss.beta=0.04` -> ("loss.beta", 0.04); the value is read as YAML, so lists and null work."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value against the annotations."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in raw if key not in names]
    if unknown:
        key = str(unknown[0])
        near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {_describe(value)} matches none of {hint}")
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint_text = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return {_coerce(args[0], k, f"{key}") : _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-3` (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):  # `key={prompt}` on the command line is a YAML mapping
            raise ConfigError(f"{key}: expected str, got {_describe(value)}; text with braces or brackets must be "
                              f"quoted, e.g. {key}='\"{{prompt}}\"' on the command line")
    else:
        raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {_describe(value)}")


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


# ---------------------------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    from grpo_kd.fsutil import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))
