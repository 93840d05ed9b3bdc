"""A memory model of each phase on one GPU, from the config and the models' architecture facts alone.

    phases = phase_memory(cfg, student_facts, teacher_facts)     # [PhaseMemory] rollout, cache-teacher, update
    phases[0].parts        # {"student weights": bytes, "KV cache": bytes, ...} on the busiest GPU
    phases[0].fits         # total <= available: slurm.gpu_memory_gb GiB (x vllm.gpu_memory_utilization for vLLM)

Key design choice: an estimate a person can check by hand, part by part, with the formula of each part written
next to it; every figure is per GPU of the phase's SLURM request (weights split over the GPUs that share them:
`device_map`/tensor parallelism for a teacher, FSDP for a fully trained student). What is counted:

    weights          parameters x bytes of the dtype (bf16/fp16 2, fp32 4); 4-bit (NF4): 0.5625 bytes per
                     decoder parameter (4 bits + one fp32 absmax per 64) with embeddings and head in 16-bit
    LoRA             r x (in + out) per adapted projection of every layer, float32, with its float32 gradient and
                     two Adam moments: 16 bytes per adapter parameter
    full training    16-bit weights 2 + float32 master weights 4 + Adam moments 8 + 16-bit gradients 2 = 16
                     bytes per parameter (grpo_kd/train/optim.py gives every 16-bit parameter a float32 master)
    activations      per token and layer (8 h + 2 kv_heads head_dim + 4 i) x 2 bytes kept for the backward (the
                     inputs of norms, projections and the gated MLP; no attention-score matrix with SDPA), for
                     micro_batch_size x (max_prompt_tokens + max_new_tokens) tokens; with gradient checkpointing
                     2 h bytes per token and layer plus one layer's full set
    KV cache         2 x layers x kv_heads x head_dim x 2 bytes per token (sliding-window layers up to their
                     window), for rollout.batch_size x group_size rows of max_prompt_tokens + max_new_tokens
    logit buffers    the fused kernels' float32 chunk (1 GiB on CUDA, grpo_kd/kernels/_common.py) twice (values
                     and gradient); the sampler's float32 logits of every decoding row (rows x vocabulary x 4 x 2);
                     a vLLM teacher's prompt log-probs: one engine step's tokens x vocabulary x 4
    vLLM             weights split over its tensor-parallel GPUs, and the limit is vllm.gpu_memory_utilization
                     (0.85) of each GPU, not all of it
    second models    a teacher mixed into sampling (a self-teacher: a second copy of the student), the reference
                     of the teacher pass, a live reference in the update where nothing cached replaces it
    overhead         2 GiB per GPU: the CUDA context, allocator fragmentation, communication buffers

It is a plan, not a measurement: within some tens of percent for the weights and optimizer state, looser for
activations. The rule it enforces is the coarse one that matters before a job queues for hours: does the phase
fit on the GPUs it asks for at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo_kd.arch import ArchFacts
from grpo_kd.config import Config

GIB = 2**30
CUDA_CONTEXT = 2 * GIB  # per GPU: CUDA context, allocator fragmentation, NCCL buffers
KERNEL_CHUNK = 2**30  # float32 logits of one row chunk of the fused kernels on CUDA (kernels/_common.py)
LORA_BYTES = 16  # float32 adapter weight, gradient and two Adam moments
FULL_BYTES = 16  # 16-bit weight 2 + float32 master 4 + Adam moments 8 + 16-bit gradient 2
NF4_BYTES = 0.5625  # 4 bits and one float32 absmax per block of 64
VLLM_STEP_TOKENS = 16384  # vLLM's own max_num_batched_tokens for its offline LLM class on >= 70 GB GPUs
# (vllm 0.32, engine/arg_utils.py), when vllm.max_num_batched_tokens is unset


@dataclass
class PhaseMemory:
    """The bytes one GPU of a phase holds at its peak, by part, against what the GPU has."""

    phase: str
    gpus: int  # GPUs the phase's job asks for (nodes x gpus_per_node), at least 1
    available: int  # bytes of one GPU (slurm.gpu_memory_gb)
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def dtype_bytes(dtype: str, *, on_gpu: bool = True) -> int:
    """Bytes per parameter of a model loaded with `dtype` ("auto" is bf16 on a GPU, as grpo_kd.device chooses)."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2 if on_gpu else 4)


def weight_bytes(facts: ArchFacts, dtype: str, *, four_bit: bool = False) -> float:
    """The resident weights: every parameter (a vision tower too: the checkpoint loads it) in its dtype."""
    total = facts.text_parameters + facts.vision_parameters
    if not four_bit:
        return total * dtype_bytes(dtype)
    embeddings = facts.vocab_size * facts.hidden_size * (1 if facts.tied_embeddings else 2)
    return (total - embeddings) * NF4_BYTES + embeddings * 2


def lora_parameters(facts: ArchFacts, r: int, targets: list[str]) -> int:
    """r x (in + out) of each adapted projection, over every decoder layer (names as in LLaMA / Mistral / Gemma,
    and GPT-2's fused c_attn / c_proj / c_fc)."""
    h, i, q, kv = facts.hidden_size, facts.intermediate_size, facts.num_heads * facts.head_dim, \
        facts.num_kv_heads * facts.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h), "c_attn": (h, 3 * h), "c_fc": (h, i)}
    per_layer = sum(r * sum(shapes[t]) for t in targets if t in shapes)
    if "c_proj" in targets:  # GPT-2 names both the attention and the MLP output c_proj
        per_layer += r * (h + h) + r * (i + h)
    return per_layer * facts.num_layers


def activation_bytes(facts: ArchFacts, tokens: int, *, checkpointing: bool) -> float:
    """Activations kept for the backward of `tokens` tokens (see the module doc)."""
    per_layer = (8 * facts.hidden_size + 2 * facts.num_kv_heads * facts.head_dim + 4 * facts.intermediate_size) * 2
    if checkpointing:
        return tokens * (2 * facts.hidden_size * facts.num_layers + per_layer)
    return tokens * per_layer * facts.num_layers


def kv_cache_bytes(facts: ArchFacts, rows: int, length: int) -> float:
    return rows * length * facts.kv_bytes_per_token(2, context=length)


def _gpus(cfg: Config, phase: str) -> int:
    job = getattr(cfg.slurm, phase.replace("-", "_"))
    return max(1, job.nodes * job.gpus_per_node)


def _vllm_share(cfg: Config, mem: PhaseMemory) -> int:
    """A vLLM phase: the GPUs its tensor parallelism spreads over, and the share of each GPU it may take (its
    weights, KV cache and step buffers must fit in vllm.gpu_memory_utilization x the GPU)."""
    from grpo_kd.engines.vllm_engine import GPU_MEMORY_UTILIZATION

    share = cfg.vllm.gpu_memory_utilization or GPU_MEMORY_UTILIZATION
    mem.available = int(share * cfg.slurm.gpu_memory_gb * GIB)
    mem.notes.append(f"vLLM may take vllm.gpu_memory_utilization={share:g} of each GPU: that is the limit shown")
    return min(cfg.vllm.tensor_parallel_size or mem.gpus, mem.gpus)


def rollout_memory(cfg: Config, student: ArchFacts, teacher: ArchFacts | None) -> PhaseMemory:
    """The student (and a mixing teacher) decoding `batch_size x group_size` rows with their KV caches."""
    r, m = cfg.rollout, cfg.model
    mem = PhaseMemory("rollout", _gpus(cfg, "rollout"), int(cfg.slurm.gpu_memory_gb * GIB))
    rows, length = r.batch_size * r.group_size, cfg.data.max_prompt_tokens + r.max_new_tokens
    share = _vllm_share(cfg, mem) if r.engine == "vllm" else 1  # vLLM: tensor parallelism over the job's GPUs
    mem.parts["student weights"] = weight_bytes(student, m.dtype, four_bit=m.load_in_4bit) / share
    mem.parts["student KV cache"] = kv_cache_bytes(student, rows, length) / share
    mem.parts["sampling logits"] = rows * student.vocab_size * 4 * 2
    if r.teacher_mix_alpha > 0:
        t = cfg.teacher
        if teacher is not None:
            spread = mem.gpus if t.device_map else 1
            mem.parts["mixing teacher weights"] = weight_bytes(teacher, t.dtype, four_bit=t.load_in_4bit) / spread
            mem.parts["mixing teacher KV cache"] = kv_cache_bytes(teacher, rows, length) / spread
        else:  # self_base: models.load_teacher loads a second copy of the student
            mem.parts["mixing self-teacher weights"] = weight_bytes(student, m.dtype, four_bit=m.load_in_4bit)
            mem.parts["mixing self-teacher KV cache"] = kv_cache_bytes(student, rows, length)
    mem.parts["CUDA context and fragmentation"] = CUDA_CONTEXT
    if r.engine == "vllm":
        mem.notes.append(f"the KV cache shown is what {rows} rows of {length} tokens need; vLLM fills what is "
                         "left of its share with more")
    return mem


def teacher_memory(cfg: Config, student: ArchFacts, teacher: ArchFacts | None) -> PhaseMemory:
    """The larger of the reference pass (the student's base) and the teacher pass, one model at a time."""
    t = cfg.teacher
    mem = PhaseMemory("cache-teacher", _gpus(cfg, "cache-teacher"), int(cfg.slurm.gpu_memory_gb * GIB))
    model = teacher if (t.kind == "model" and teacher is not None) else student
    spread = _vllm_share(cfg, mem) if t.engine == "vllm" else (mem.gpus if t.device_map else 1)
    dtype = t.dtype if t.kind == "model" else cfg.model.dtype
    weights = weight_bytes(model, dtype, four_bit=t.load_in_4bit if t.kind == "model" else cfg.model.load_in_4bit)
    step = (cfg.vllm.max_num_batched_tokens or VLLM_STEP_TOKENS) if t.engine == "vllm" else t.token_budget
    forward = step * (model.hidden_size + model.intermediate_size) * 2 * 2  # one layer's transients, 16-bit
    reference = 0.0
    if t.reference:  # the student's initial model: a QLoRA student's is its 4-bit base
        reference = weight_bytes(student, cfg.model.dtype, four_bit=cfg.model.load_in_4bit)
        reference /= spread if t.engine == "vllm" else 1
    if reference > weights / spread:
        mem.parts["reference model weights (its own pass)"] = reference
        mem.notes.append("the reference pass (the student's base) is the larger of the two model passes")
    else:
        mem.parts["teacher weights" + (f" (1/{spread})" if spread > 1 else "")] = weights / spread
    mem.parts[f"forward activations ({step} tokens)"] = forward
    if t.engine == "vllm":  # prompt log-probs: float32 logits of one engine step's tokens, on every GPU
        mem.parts[f"prompt log-prob logits ({step} tokens)"] = step * model.vocab_size * 4
    else:
        mem.parts["top-k kernel chunk"] = KERNEL_CHUNK
    mem.parts["CUDA context and fragmentation"] = CUDA_CONTEXT
    return mem


def update_memory(cfg: Config, student: ArchFacts) -> PhaseMemory:
    """The student in training: weights, LoRA or full optimizer state (FSDP-sharded), activations, kernel
    buffers, and a live reference model when the KL needs one the cache does not hold."""
    m, o = cfg.model, cfg.optim
    mem = PhaseMemory("update", _gpus(cfg, "update"), int(cfg.slurm.gpu_memory_gb * GIB))
    shards = mem.gpus if o.data_parallel == "fsdp" else 1
    params = student.text_parameters + student.vision_parameters
    if m.lora:
        mem.parts["student weights (frozen)"] = weight_bytes(student, m.dtype, four_bit=m.load_in_4bit) / shards
        adapters = lora_parameters(student, m.lora_r, m.lora_target_modules)
        mem.parts["LoRA adapters, gradients, Adam"] = adapters * LORA_BYTES
    else:
        per = FULL_BYTES if dtype_bytes(m.dtype) == 2 else 16  # fp32: 4 weight + 4 grad + 8 Adam
        mem.parts["weights, masters, gradients, Adam" + (f" (1/{shards}, FSDP)" if shards > 1 else "")] = (
            params * per / shards)
    tokens = o.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    mem.parts["activations (one micro-batch)"] = activation_bytes(student, tokens,
                                                                 checkpointing=m.gradient_checkpointing)
    mem.parts["kernel chunks (logits, gradient)"] = 2 * KERNEL_CHUNK
    # update_state.Reference: a LoRA student's reference is itself with adapters off; a fully trained one loads
    # its initial model when the KL (or self_distill's base log-probs) has nothing cached to read
    t = cfg.teacher
    base_cached = t.reference or (cfg.loss.algorithm == "self_distill" and t.kind == "self_base")
    live = (cfg.loss.reference_beta > 0 and not t.reference) or (cfg.loss.algorithm == "self_distill"
                                                                  and not base_cached)
    if live and not m.lora:
        mem.parts["live reference model"] = weight_bytes(student, m.dtype)
        mem.notes.append("the KL to the reference is computed live with a second copy of the initial student "
                         "(teacher.reference=false and no LoRA): set teacher.reference=true to cache it instead")
    mem.parts["CUDA context and fragmentation"] = CUDA_CONTEXT
    return mem


def phase_memory(cfg: Config, student: ArchFacts, teacher: ArchFacts | None) -> list[PhaseMemory]:
    return [rollout_memory(cfg, student, teacher), teacher_memory(cfg, student, teacher), update_memory(cfg, student)]
