"""Batched decoding for evaluation: greedy (FoQA) or sampled (distill, diversity), with a progress bar.

Key design choice: evaluation decodes through `transformers`' `generate` (left padding, KV cache), not through
the rollout phase, so that it can run on any checkpoint or hub model without a run directory; the rollout phase
owns the training-time sampler. Completions are cut after the first eos, and optionally at the first newline
(FoQA answers are one line): a stopping criterion ends a batch early once every row has produced a newline
token, so a short answer does not cost `max_new_tokens` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from grpo_kd.progress import progress


@dataclass
class Generation:
    prompt_ids: list[int]  # the prompt as the model saw it (no padding)
    completion_ids: list[int]  # sampled tokens, up to and including the first eos, no padding
    text: str  # the decoded completion without special tokens (cut at the first newline when asked)
    finish_reason: str  # "stop" (eos or newline) or "length"


def newline_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens whose text contains a newline (decoded one by one; done once per tokenizer)."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids])
    return {i for i, text in zip(ids, texts) if "\n" in text}


class _AllRowsStopped:
    """Stopping criterion: True once every row has emitted one of `stop_ids` after the prompt."""

    def __init__(self, stop_ids: set[int], prompt_length: int):
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :]  # (B, t)
        hit = torch.isin(new, self.stop_ids.to(new.device)).any(dim=1)  # (B,)
        return torch.full_like(hit, bool(hit.all()))


def _trim(completion: list[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], str]:
    for position, token in enumerate(completion):
        if token in eos_ids:
            return completion[: position + 1], "stop"
    if pad_id is not None and pad_id not in eos_ids:
        while completion and completion[-1] == pad_id:
            completion = completion[:-1]
    return completion, "length"


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    max_prompt_tokens: int = 1024,
    stop_at_newline: bool = False,
    add_special_tokens: bool = True,
    seed: int = 0,
    description: str = "generating",
) -> list[Generation]:
    """Decode a completion for each prompt, in batches of `batch_size`; prompts longer than
    `max_prompt_tokens` keep their last tokens (the question sits at the end of a FoQA prompt).
    `add_special_tokens=False` for chat-rendered prompts, whose template already wrote them (as in rollout)."""
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    stop_ids = newline_token_ids(tokenizer) if stop_at_newline else set()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    results: list[Generation] = []
    try:
        for start in progress(range(0, len(prompts), batch_size), description=description):
            batch = list(prompts[start : start + batch_size])
            encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"][-max_prompt_tokens:] for p in batch]
            results.extend(
                _generate_batch(model, tokenizer, encoded, device, eos_ids, stop_ids, max_new_tokens,
                                do_sample, temperature, top_p)
            )
    finally:
        torch.random.set_rng_state(generator_state)
    return results


def _generate_batch(model, tokenizer, encoded, device, eos_ids, stop_ids, max_new_tokens, do_sample, temperature,
                    top_p) -> list[Generation]:
    pad_id = tokenizer.pad_token_id
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (B, T) left-padded
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, do_sample=do_sample)
    if do_sample:  # plain ancestral sampling unless top_p < 1; the model's own generation defaults are overridden
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if eos_ids:
        kwargs["eos_token_id"] = sorted(eos_ids)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows > len(tokenizer):  # vocabulary padding (Gemma-3): rows that are no token are never drawn
        kwargs["suppress_tokens"] = list(range(len(tokenizer), rows))
    if stop_ids:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_AllRowsStopped(stop_ids | eos_ids, width)])
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    generations = []
    for row, ids in enumerate(encoded):
        completion, reason = _trim(output[row, width:].tolist(), eos_ids, pad_id)
        text = tokenizer.decode(completion, skip_special_tokens=True)
        if stop_ids:
            head, newline, _ = text.partition("\n")
            text, reason = head, ("stop" if newline else reason)
        generations.append(Generation(prompt_ids=list(ids), completion_ids=completion, text=text, finish_reason=reason))
    return generations
