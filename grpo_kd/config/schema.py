"""The run configuration's schema: small nested dataclasses, one per concern, each default written once here.

The command line, the SLURM scripts and the phases read a resolved `Config`, never their own fallbacks; the
loader (`loader.py`) validates a YAML file and dotted overrides against these annotations, and `rules.py`
holds every rule that relates fields to each other. The loss has one section per concern, and an algorithm
reads only its own (`ALGORITHM_SECTIONS`): a config shows, and may set, only what its algorithm reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

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
    engine: Literal["hf", "vllm"] = "hf"  # vllm: sample with vLLM (settings in `vllm`); see grpo_kd/engines
    # true: old_logprobs from one full forward after sampling (the update's own computation); false: the sampling
    # loop's own values (equal up to float rounding in float32; saves that forward; not with teacher mixing);
    # None: recompute where the two differ by more than rounding: a 16-bit student, or teacher mixing
    recompute_logprobs: bool | None = None


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
    engine: Literal["hf", "vllm"] = "hf"  # vllm: score (teacher and reference) with vLLM's prompt log-probs

    # Keys of earlier versions that no setting replaces, refused with the reason.
    REMOVED: ClassVar[dict[str, str]] = {
        "cross_tokenizer": "a teacher with another vocabulary needs no setting: its log-probs are aligned onto the "
                           "student's tokens byte by byte (docs/cache.md); remove the key",
        "cross_tokenizer_norm": "a teacher with another vocabulary gives per-token values like any teacher, and the "
                                "teacher_loglik reward is their mean per student token; remove the key",
    }


@dataclass
class PolicyLossConfig:
    """The clipped policy-gradient surrogate and the KL to the reference (grpo, ppo, minillm, self_distill)."""

    beta: float = 0.04  # KL-to-reference coefficient (k3 estimator); 0 = no reference needed
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # truncated importance sampling (rollout.engine vllm): each token's policy-gradient term is weighted by
    # min(exp(old_logprobs - sampler_logprobs), tis_cap), the trainer's over vLLM's probability; 0 = off
    tis_cap: float = 0.0


# the names loss.reward.weights may weight: per completion, then per token (grpo_kd.train.rewards computes them)
REWARD_COMPONENTS = ("teacher_loglik", "inverse_loss", "length", "teacher_logprob", "log_ratio")


@dataclass
class RewardConfig:
    """The named, weighted reward components of grpo, ppo and self_distill."""

    kind: Literal["teacher_loglik", "minillm"] = "teacher_loglik"
    # {} = the default of the algorithm: {teacher_loglik: 1} (kind teacher_loglik), {log_ratio: 1} (kind minillm),
    # {inverse_loss: 1} (self_distill); see grpo_kd.train.algorithms.common.reward_weights. Components: sequence
    # teacher_loglik, inverse_loss, length (PPO pays them at the last token); per token teacher_logprob, log_ratio
    # (PPO pays them at every token; GRPO averages them per sequence). grpo_kd/train/rewards.py has the formulas.
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class GrpoConfig:
    """Group-relative advantages (grpo, self_distill)."""

    scale_rewards: bool = True  # divide group-relative advantages by the group's std


@dataclass
class PpoConfig:
    """The critic and GAE of ppo, and where its KL to the reference goes."""

    gamma: float = 1.0
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    # the KL to the reference as a per-token reward penalty -beta (log q_old - log q_ref) (classic RLHF PPO) instead
    # of the loss's beta * k3 term; beta is loss.policy.beta either way
    kl_in_reward: bool = False
    # divide every per-token reward (token components and the KL penalty) by the completion's length, so that the
    # return from the first token is a mean per token, as GRPO's sequence reward is: a sum of per-token
    # log-ratios (negative on average: minus the KL) otherwise pays a completion for ending sooner
    length_normalize: bool = False


@dataclass
class MiniLLMConfig:
    """MiniLLM's long-term term and its teacher-mixed importance weights. The defaults are the reference
    implementation's (microsoft/LMOps minillm; docs/experiments.md, "MiniLLM's long-term return")."""

    gamma: float = 0.95  # discount of the long-term return (LMOps' default)
    importance_clip: float = 0.2  # clip of the teacher-mixed importance weights (and of the surrogate's ratio)
    length_normalize: bool = True  # divide the return by the number of rewards it sums
    include_current: bool = True  # the return from t includes r_t (LMOps); false: eq. 7's R_{t+1}, 0 at the end
    whiten: bool = True  # advantages = the returns whitened over the prepared batch (LMOps); false: the raw returns


@dataclass
class TeacherKLConfig:
    """The token-level divergence to the cached teacher (minillm's single-step term, privileged)."""

    divergence: Literal["forward", "reverse", "jsd"] = "reverse"
    jsd_beta: float = 0.5
    tail: Literal["bucket", "renorm", "uniform"] = "bucket"
    # over the cached top-k ("topk"), or the unbiased forward-KL estimate from the cached samples ("sampled":
    # needs teacher.num_samples > 0 and divergence "forward"; tail is ignored)
    estimate: Literal["topk", "sampled"] = "topk"


@dataclass
class PretrainConfig:
    """L_PT: the language-modelling loss on pre-training text, added to any algorithm when weight > 0."""

    weight: float = 0.0
    batch_size: int = 8  # pre-training sequences per optimizer step (over all ranks)
    seq_len: int = 256  # tokens per pre-training sequence


ALGORITHMS = ("grpo", "ppo", "minillm", "self_distill", "privileged")
ALGORITHM_SECTIONS: dict[str, tuple[str, ...]] = {  # the loss sections each algorithm reads
    "grpo": ("policy", "reward", "grpo", "pt"),
    "ppo": ("policy", "reward", "ppo", "pt"),
    "minillm": ("policy", "minillm", "teacher_kl", "pt"),
    "self_distill": ("policy", "reward", "grpo", "pt"),
    "privileged": ("teacher_kl", "pt"),
}

# Defaults that depend on the algorithm, as dotted keys under `loss` (the one place each lives): the loader puts
# them beneath the file and the overrides, so a config that sets the key keeps its value. The dataclass default
# holds for every algorithm not named here.
ALGORITHM_DEFAULTS: dict[str, dict[str, object]] = {
    "minillm": {"policy.beta": 0.0},  # MiniLLM's objective (reverse KL to the teacher + L_PT) has no KL to a reference
}


@dataclass
class LossConfig:
    """The algorithm and its objective, one section per concern; only the algorithm's sections are read."""

    algorithm: Literal["grpo", "ppo", "minillm", "self_distill", "privileged"] = "grpo"
    policy: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    teacher_kl: TeacherKLConfig = field(default_factory=TeacherKLConfig)
    pt: PretrainConfig = field(default_factory=PretrainConfig)

    # The flat keys of earlier versions, refused with the key that replaced them.
    RENAMED: ClassVar[dict[str, str]] = {
        "reward_weights": "loss.reward.weights", "beta": "loss.policy.beta",
        "epsilon_low": "loss.policy.epsilon_low", "epsilon_high": "loss.policy.epsilon_high",
        "loss_type": "loss.policy.loss_type", "importance_sampling_level": "loss.policy.importance_sampling_level",
        "scale_rewards": "loss.grpo.scale_rewards", "divergence": "loss.teacher_kl.divergence",
        "jsd_beta": "loss.teacher_kl.jsd_beta", "tail": "loss.teacher_kl.tail",
        "teacher_estimate": "loss.teacher_kl.estimate", "pt_weight": "loss.pt.weight",
        "gamma": "loss.ppo.gamma or loss.minillm.gamma", "gae_lambda": "loss.ppo.gae_lambda",
        "value_coef": "loss.ppo.value_coef", "importance_clip": "loss.minillm.importance_clip",
        "length_normalize": "loss.minillm.length_normalize or loss.ppo.length_normalize", "pt_batch_size": "loss.pt.batch_size",
        "pt_seq_len": "loss.pt.seq_len",
    }

    @property
    def sections(self) -> tuple[str, ...]:
        """The sections this algorithm reads."""
        return ALGORITHM_SECTIONS[self.algorithm]

    @property
    def reference_beta(self) -> float:
        """The weight of the KL to the reference: `policy.beta` where the algorithm reads it, else 0."""
        return self.policy.beta if "policy" in self.sections else 0.0

    @property
    def loss_kl_beta(self) -> float:
        """The weight of the k3 KL term in the loss: `reference_beta`, except 0 where PPO pays it in its reward."""
        return 0.0 if self.algorithm == "ppo" and self.ppo.kl_in_reward else self.reference_beta


@dataclass
class SftConfig:
    """Phase 0: supervised fine-tuning of the student before iteration 1 (`grpo-kd sft`; grpo_kd/train/sft.py).
    Batches, schedule and clipping come from `optim`; its checkpoint, checkpoints/iter_0000, is iteration 1's student."""

    enabled: bool = False  # `grpo-kd run` and `chain submit` run phase 0 before iteration 1
    # "" = the training prompts (data.*, held-out split excluded), each with its continuation: data.privileged_field,
    # or with data.prefix_words the rest of the sentence. Else a file or dataset of its own, read as below.
    source: str = ""
    format: Literal["auto", "jsonl", "parquet", "text", "conllu", "hf"] = "auto"
    plain_text: bool = False  # the source is plain text (lines, sentences or text_field): every token is trained
    prompt_field: str = "prompt"
    continuation_field: str = "continuation"  # appended to the prompt as written; the loss is on it alone
    text_field: str = "text"
    prefix_words: int = 0  # text / CoNLL-U source as pairs: the first N words prompt, the rest the continuation
    max_examples: int | None = None
    seq_len: int = 256  # plain text: tokens per block; pairs: the continuation is cut to this many tokens
    epochs: int = 1
    max_steps: int = 0  # 0: every step of `epochs`; else at most this many optimizer steps
    lr: float | None = None  # None: optim.lr


@dataclass
class VllmConfig:
    """vLLM engine settings, for `rollout.engine: vllm` and `teacher.engine: vllm` (grpo_kd/engines/)."""

    # None: 0.85 on GPUs; on a CPU (where vLLM reads it as a share of host memory) the KV cache is sized to the phase
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 0  # 0: every GPU the job sees (1 on a CPU)
    enforce_eager: bool = False  # True: no torch.compile / CUDA graphs (faster start, slower steps)
    max_num_seqs: int = 256  # sequences the engine batches at once
    max_model_len: int | None = None  # None: the longest prompt + completion of the phase
    # tokens per engine step (None: vLLM's default); the teacher pass's prompt log-probs take about
    # this x vocabulary x 4 bytes per step: lower it for a 262k-vocabulary teacher that runs short of memory
    max_num_batched_tokens: int | None = None


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
    # a step whose loss or gradient norm is NaN or inf: "stop" the update there (no checkpoint), or "skip" it
    # (no optimizer step; counted as `skipped` in logs/metrics.jsonl and in `grpo-kd report`)
    nonfinite: Literal["stop", "skip"] = "stop"


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
    sft: SlurmPhaseConfig = field(default_factory=SlurmPhaseConfig)  # phase 0, when sft.enabled
    gpu_memory_gb: float = 80.0  # memory of one GPU in GiB (an "80 GB" A100/H100): what `grpo-kd plan` fits into
    gpu_tflops: float = 312.0  # one GPU's bf16 dense peak (A100 312, H100 SXM 989): plan's time estimate
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
class TrackingConfig:
    """Where each phase's numbers go besides logs/metrics.jsonl, on one step axis (grpo_kd/train/tracking.py)."""

    tensorboard: bool = True  # event files under RUN/logs/tensorboard/ (`tensorboard --logdir RUN/logs`)
    wandb: bool = False  # Weights & Biases (pip install 'grpo-kd[wandb]')
    wandb_project: str = "grpo-kd"
    wandb_entity: str | None = None
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files under RUN/logs/wandb, `wandb sync` later


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 0
    iterations: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
