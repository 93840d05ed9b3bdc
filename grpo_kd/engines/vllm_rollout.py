"""The rollout's sampling with vLLM (`rollout.engine: vllm`); `grpo_kd.train.rollout` writes the same shard.

    samples, engine = sample_with_vllm(cfg, checkpoint, prompt_ids, seeds, params, tokenizer, show_progress=False)

vLLM samples every completion of the shard in one `generate` call (continuous batching over the whole shard),
one request per completion with its own seed (`grpo_kd.train.rollout.sample_seed(seed, iteration, group_id,
sample_index)`): a completion depends on its seed and the model, not on the batch or the shard layout (as on the
transformers path, though the two engines draw different tokens from one seed: vLLM has its own generator).
Temperature, top-k and top-p are vLLM's; a completion stops at the student's eos ids (`grpo_kd.models.
eos_token_ids`, kept in `completion_ids` with finish reason "stop") or at `rollout.max_new_tokens`. The student is
the initial model (or phase 0's SFT checkpoint) at iteration 1, else the previous update's checkpoint: full
weights as a model directory, a peft adapter through vLLM's LoRA support on the base weights.

The engine is shut down before returning, and the rollout phase loads the transformers student: the behaviour
log-probs (`old_logprobs`) are recomputed with `grpo_kd.train.policy.completion_logprobs`, as the update computes
them, so the first importance ratio of the update is 1 up to float rounding whatever vLLM's numerics. vLLM's own
log-probs of the same tokens (`Sample.sampling_logprobs`, processed: at the sampling temperature, after
top-k/top-p) are stored as `sampler_logprobs`, and their difference to `old_logprobs` is the manifest's
`logprob_drift` (mean and max |delta| per token). With top-k/top-p the difference also holds the log of the
truncation's kept mass. `loss.policy.tis_cap` turns the ratio of the two into truncated importance weights in
the update (grpo_kd.train.algorithms.common).
"""

from __future__ import annotations

import json
import logging
import time
import types
from pathlib import Path
from typing import Any, Sequence

from grpo_kd.config import Config
from grpo_kd.engines.vllm_engine import ModelSource, lora_request, model_config, open_engine, require_vllm
from grpo_kd.models import eos_token_ids, student_weights
from grpo_kd.train.sampling import Sample, SamplingParams

log = logging.getLogger(__name__)


def student_source(cfg: Config, checkpoint: Path | None) -> ModelSource:
    """The student of this iteration as vLLM serves it: full weights, or base weights plus the adapter."""
    base, adapter = student_weights(cfg.model, None if checkpoint is None else str(checkpoint))
    rank = 0
    if adapter is not None:
        rank = int(json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    return ModelSource(path=base, tokenizer=cfg.model.tokenizer or cfg.model.path, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code, adapter=adapter, lora_rank=rank)


def student_eos_ids(source: ModelSource, tokenizer) -> set[int]:
    """The ids that end a completion, by the rule of `grpo_kd.models.eos_token_ids`, read from the checkpoint's
    generation config (the transformers model is not loaded yet)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(source.path)
    except OSError:  # no generation_config.json: the model config's eos, as transformers would use
        generation = GenerationConfig.from_model_config(model_config(source))
    return eos_token_ids(types.SimpleNamespace(generation_config=generation), tokenizer)


def vllm_sampling_params(params: SamplingParams, seed: int, eos_ids: set[int]):
    """vLLM's `SamplingParams` of one completion."""
    from vllm import SamplingParams as VllmParams

    return VllmParams(n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                      max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=sorted(eos_ids), logprobs=0,
                      detokenize=False)


def generate(llm, source: ModelSource, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int],
             params: SamplingParams, eos_ids: set[int], *, show_progress: bool = False) -> list[Sample]:
    """One completion per row, row r drawn with `seeds[r]`; `Sample.sampling_logprobs` are vLLM's."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in prompt_ids]
    per_row = [vllm_sampling_params(params, int(seed), eos_ids) for seed in seeds]
    outputs = llm.generate(prompts, per_row, use_tqdm=show_progress, lora_request=lora_request(source))
    return [_sample(out.outputs[0]) for out in outputs]


def _sample(completion) -> Sample:
    ids = [int(t) for t in completion.token_ids]
    logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs)]  # (C,)
    reason = "stop" if completion.finish_reason == "stop" else "length"
    return Sample(ids, reason, logprobs)


def sample_with_vllm(cfg: Config, checkpoint: Path | None, prompt_ids: Sequence[Sequence[int]],
                     seeds: Sequence[int], params: SamplingParams, tokenizer, *,
                     show_progress: bool) -> tuple[list[Sample], dict[str, Any]]:
    """(one Sample per row, the engine's description for the manifest incl. "sampling_seconds"): the student of
    this iteration serves every row in one `generate` call; the engine is shut down before returning."""
    version = require_vllm()
    source = student_source(cfg, checkpoint)
    eos_ids = student_eos_ids(source, tokenizer)
    longest = max((len(ids) for ids in prompt_ids), default=1) + params.max_new_tokens
    with open_engine(cfg, source, max_model_len=longest, max_logprobs=1, requests=len(prompt_ids)) as llm:
        started = time.perf_counter()
        samples = generate(llm, source, prompt_ids, seeds, params, eos_ids,
                           show_progress=show_progress) if prompt_ids else []
        seconds = time.perf_counter() - started
    engine = {"name": "vllm", "version": version, "logprobs_mode": "processed_logprobs",
              "adapter": None if source.adapter is None else str(source.adapter), "sampling_seconds": seconds}
    return samples, engine
