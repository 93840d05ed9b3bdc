"""The teacher and reference passes with vLLM (`teacher.engine: vllm`): the same cache as the transformers path.

    with teacher_scorer(cfg, paths, iteration, tokenizer, spec, pending) as (scorer, model_fingerprint): ...
    with reference_scorer(cfg, spec, pending) as (scorer, model_fingerprint): ...

`VllmScorer` is the transformers `Scorer` with another source of values: the inputs (prompt ids, rebuilt for the
privileged self-teacher; completion ids; for a teacher of another tokenizer its own tokens of the prompt, the
completion text and the end of turn, aligned onto the student's tokens afterwards exactly as on the transformers
path; length-sorted batches under `teacher.token_budget`; batches kept by a killed run) and the assembly into
`ScoredRows` are the Scorer's own,
while each batch is one `generate` call with one request per row, `prompt + completion` as the prompt,
`max_tokens=1` and `prompt_logprobs=k` (0 for the reference and a teacher of another tokenizer).

What vLLM returns at prompt position p, predicting token p: the log-prob of that token and the top-k (ids and
log-probs, in rank order), each `log_softmax` over the full vocabulary in float32 of the model's logits after its
own final soft cap (Gemma's `final_logit_softcapping`), untempered whatever `logprobs_mode` says (prompt tokens do
not pass the sampler). That is the cache spec at `teacher.temperature` 1 with the model's soft cap, which
`grpo_kd.config.check_engines` and `vllm_engine.preflight` require. Completion token t of a row with P prompt
tokens sits at position P + t. Tensor parallelism is `vllm.tensor_parallel_size` (default: every GPU of the job).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import numpy as np
import torch

from grpo_kd.cache.rollouts import RolloutShard
from grpo_kd.cache.teacher import CacheSpec
from grpo_kd.config import Config
from grpo_kd.engines.vllm_engine import ModelSource, checkpoint_fingerprint, lora_request, open_engine
from grpo_kd.engines.vllm_rollout import student_source
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import student_checkpoint
from grpo_kd.train.teacher_scoring import Scorer
from grpo_kd.xtok import Aligner

log = logging.getLogger(__name__)


class VllmScorer(Scorer):
    """A `Scorer` whose values come from vLLM's prompt log-probs. It subclasses only to share the Scorer's
    inputs and assembly; `_hidden` returns a batch's log-probs in place of hidden states."""

    def __init__(self, cfg: Config, source: ModelSource, tokenizer, spec: CacheSpec, reference: bool = False,
                 aligner: Aligner | None = None):
        self.set_inputs(cfg, tokenizer, spec, reference, aligner)
        self.source = source
        self.top_k = spec.top_k if spec.token_level and not reference else 0
        self.llm = None  # set once the engine is started (its length limit comes from these inputs)

    def longest(self, shards: list[RolloutShard]) -> int:
        """The longest prompt + completion of `shards` as this scorer builds them, plus the generated token."""
        longest = 1
        for shard in shards:
            for p, c in zip(*self._inputs(shard)):
                longest = max(longest, len(p) + len(c))
        return longest + 1

    @torch.no_grad()
    def _hidden(self, prompts, completions, rows: np.ndarray):
        """((topk ids (N, k) int32, topk log-probs (N, k) float32, target log-probs (N,) float32), None, C)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in prompts[i]] + [int(t) for t in completions[i]])
                    for i in rows]
        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, detokenize=False, flat_logprobs=True)
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora_request(self.source))
        P = np.array([len(prompts[i]) for i in rows], np.int64)
        C = np.array([len(completions[i]) for i in rows], np.int64)
        parts = [completion_logprobs(out.prompt_logprobs, int(p), int(c), self.top_k)
                 for out, p, c in zip(outputs, P, C)]
        ids = np.concatenate([part[0] for part in parts]) if parts else np.zeros((0, self.top_k), np.int32)
        logprobs = np.concatenate([part[1] for part in parts]) if parts else np.zeros((0, self.top_k), np.float32)
        target = np.concatenate([part[2] for part in parts]) if parts else np.zeros(0, np.float32)
        return (ids, logprobs, target), None, C

    def _token_fields(self, h, targets, seed_key) -> dict[str, np.ndarray]:  # noqa: ARG002 (the Scorer's form)
        ids, logprobs, target = h
        return {"topk_ids": ids, "topk_logprobs": self._stored_topk(torch.from_numpy(logprobs)),
                "target_logprobs": target}

    def _sampled_logprobs(self, h, targets) -> np.ndarray:  # noqa: ARG002
        return h[2]


def completion_logprobs(flat, prompt_len: int, completion_len: int, k: int) -> tuple[np.ndarray, ...]:
    """(topk ids (C, k) int32, topk log-probs (C, k) float32, target log-probs (C,) float32) of the completion
    positions P..P+C-1 of one request's `FlatLogprobs`: every position but the first holds k + 1 entries, the
    scored token first, then the top-k in rank order."""
    width = k + 1
    values = np.asarray(flat.logprobs, np.float32)  # ((L - 1) (k + 1),)
    token_ids = np.asarray(flat.token_ids, np.int64)
    start = (prompt_len - 1) * width  # position P is the (P - 1)-th with entries
    stop = start + completion_len * width
    values = values[start:stop].reshape(completion_len, width)  # (C, k + 1)
    token_ids = token_ids[start:stop].reshape(completion_len, width)
    return token_ids[:, 1:].astype(np.int32), values[:, 1:], values[:, 0].copy()


# ---------------------------------------------------------------------------------------------- the passes


def teacher_source(cfg: Config, paths: RunPaths, iteration: int) -> ModelSource:
    """The teacher as vLLM serves it: its own checkpoint, or the student (initial, or current with adapters)."""
    t = cfg.teacher
    if t.kind == "model":
        return ModelSource(path=t.path, tokenizer=t.path, dtype=t.dtype, trust_remote_code=t.trust_remote_code)
    return student_source(cfg, student_checkpoint(paths, iteration) if t.adapter else None)


@contextlib.contextmanager
def teacher_scorer(cfg: Config, paths: RunPaths, iteration: int, tokenizer, spec: CacheSpec,
                   shards: list[RolloutShard], aligner: Aligner | None = None
                   ) -> Iterator[tuple[VllmScorer, dict[str, Any]]]:
    with _scoring(cfg, teacher_source(cfg, paths, iteration), tokenizer, spec, shards, reference=False,
                  aligner=aligner) as pair:
        yield pair


@contextlib.contextmanager
def reference_scorer(cfg: Config, spec: CacheSpec, shards: list[RolloutShard]):
    """The reference: the student's initial weights, no adapter."""
    with _scoring(cfg, student_source(cfg, None), None, spec, shards, reference=True) as pair:
        yield pair


@contextlib.contextmanager
def _scoring(cfg: Config, source: ModelSource, tokenizer, spec: CacheSpec, shards: list[RolloutShard], *,
             reference: bool, aligner: Aligner | None = None):
    scorer = VllmScorer(cfg, source, tokenizer, spec, reference=reference, aligner=aligner)
    fingerprint = checkpoint_fingerprint(source.path, trust_remote_code=source.trust_remote_code)
    if source.adapter is not None:
        fingerprint["adapter"] = str(source.adapter)
    rows = sum(shard.num_rows for shard in shards)
    with open_engine(cfg, source, max_model_len=scorer.longest(shards), max_logprobs=scorer.top_k,
                     requests=rows) as llm:
        scorer.llm = llm
        try:
            yield scorer, fingerprint
        finally:
            scorer.llm = None
