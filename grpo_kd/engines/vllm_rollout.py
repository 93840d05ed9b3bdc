"""The rollout phase's sampling with vLLM (`rollout.engine: vllm`); the shard written is the transformers path's.

    records, meta = sample_shard(cfg, iteration, plan, prompts, params, checkpoint, show_progress)

Two steps, one model resident at a time:
1. vLLM samples every completion of the shard in one `generate` call (continuous batching over the whole
   shard), one request per completion with its own seed, `grpo_kd.train.rollout.sample_seed(seed, iteration,
   group_id, sample_index)`: a completion depends on its seed and the model, not on the batch or the shard
   layout (as on the transformers path, though the two engines draw different tokens from one seed: vLLM has
   its own generator). Temperature, top-k and top-p are vLLM's; a completion stops at the student's eos ids
   (`eos_token_ids`, kept in `completion_ids` with finish reason "stop") or at `rollout.max_new_tokens`. The
   student is the initial model at iteration 1, else the previous update's checkpoint: full weights as a
   model directory, a peft adapter through vLLM's LoRA support on the base weights.
2. The engine is shut down and the transformers student loaded: the behaviour log-probs (`old_logprobs`) are
   recomputed with `grpo_kd.train.policy.completion_logprobs`, as the update computes them, so the first
   importance ratio of the update is 1 up to float rounding whatever vLLM's numerics. vLLM's own log-probs of
   the same tokens are stored as `sampler_logprobs` (processed: at the sampling temperature, after top-k/top-p),
   and their difference to `old_logprobs` is the manifest's `logprob_drift` (mean and max |delta| per token).
   With top-k/top-p the difference also holds the log of the truncation's kept mass. `loss.tis_cap` turns the
   ratio of the two into truncated importance weights in the update (grpo_kd.train.algorithms.common).
"""

from __future__ import annotations

import logging
import time
import types
from pathlib import Path
from typing import Any, Sequence

from grpo_kd.config import Config
from grpo_kd.engines.vllm_engine import ModelSource, lora_request, model_config, open_engine, require_vllm
from grpo_kd.train.sampling import Sample, SamplingParams

log = logging.getLogger(__name__)


def student_source(cfg: Config, checkpoint: Path | None) -> ModelSource:
    """The student of this iteration as vLLM serves it: full weights, or base weights plus the adapter."""
    from grpo_kd.models import student_weights

    base, adapter = student_weights(cfg.model, None if checkpoint is None else str(checkpoint))
    rank = 0
    if adapter is not None:
        import json

        rank = int(json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    return ModelSource(path=base, tokenizer=cfg.model.tokenizer or cfg.model.path, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code, adapter=adapter, lora_rank=rank)


def student_eos_ids(source: ModelSource, tokenizer) -> set[int]:
    """The ids that end a completion, by the rule of `grpo_kd.train.rollout.eos_token_ids`, read from the
    checkpoint's generation config (the transformers model is not loaded yet)."""
    from transformers import GenerationConfig

    from grpo_kd.train.rollout import eos_token_ids

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


def sample_shard(cfg: Config, iteration: int, plan: dict[str, Any], prompts, params: SamplingParams,
                 checkpoint: Path | None, show_progress: bool) -> tuple[list, dict[str, Any]]:
    """(records, manifest meta) of one rollout shard sampled with vLLM; see the module doc."""
    from grpo_kd.models import load_tokenizer
    from grpo_kd.train import rollout as R

    version = require_vllm()
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    groups = [(g, prompts[g], R.prompt_ids(tokenizer, prompts[g], cfg)) for g in range(*plan["group_range"])]
    rows = [(g, ids, s) for g, _, ids in groups for s in range(cfg.rollout.group_size)]
    seeds = [R.sample_seed(cfg.seed, iteration, g, s) for g, _, s in rows]
    source = student_source(cfg, checkpoint)
    eos_ids = student_eos_ids(source, tokenizer)
    longest = max((len(ids) for _, ids, _ in rows), default=1) + params.max_new_tokens
    with open_engine(cfg, source, max_model_len=longest, max_logprobs=1, requests=len(rows)) as llm:
        started = time.perf_counter()
        samples = generate(llm, source, [ids for _, ids, _ in rows], seeds, params, eos_ids,
                           show_progress=show_progress) if rows else []
        generate_seconds = time.perf_counter() - started
    by_seed = dict(zip(seeds, samples))

    def replay(student, prompt_ids, row_seeds, params, **_) -> list[Sample]:  # noqa: ARG001 (sample_batch's form)
        return [by_seed[int(seed)] for seed in row_seeds]

    tokenizer, student, _, fingerprints = R.load_models(cfg, params, checkpoint)
    started = time.perf_counter()
    records, drift = R.sample_groups(cfg, iteration, groups, params, student, None, tokenizer, show_progress,
                                      sampler=replay, keep_sampler_logprobs=True)
    recompute_seconds = time.perf_counter() - started
    meta = {**plan, **fingerprints, **drift,
            "engine": {"name": "vllm", "version": version, "logprobs_mode": "processed_logprobs",
                       "adapter": None if source.adapter is None else str(source.adapter)},
            "generation_seconds": round(generate_seconds + recompute_seconds, 3),
            "sampling_seconds": round(generate_seconds, 3), "recompute_seconds": round(recompute_seconds, 3)}
    log.info("vLLM rollout: %d completions sampled in %.1f s, log-probs recomputed in %.1f s; |vLLM - trainer| "
             "per token: mean %.2e, max %.2e", len(records), generate_seconds, recompute_seconds,
             drift["logprob_drift"]["mean_abs"], drift["logprob_drift"]["max_abs"])
    return records, meta
