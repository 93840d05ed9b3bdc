"""Held-out negative log-likelihood per token and per byte, so that models with different tokenizers compare.

Per-token perplexity depends on the tokenizer: a tokenizer that cuts Faroese into more pieces makes each piece
easier to predict. The per-byte numbers do not: the total NLL of a text is the same quantity whatever the
segmentation (the probability of the string), so it is divided by the text's UTF-8 bytes.

    nll_per_token = sum_t -log p(x_t | x_<t) / #tokens          perplexity = exp(nll_per_token)
    nll_per_byte  = sum_t -log p(x_t | x_<t) / #UTF-8 bytes     bits_per_byte = nll_per_byte / ln 2

Every token of a text is scored: each text is tokenized without special tokens and conditioned on one start
token (the tokenizer's bos token, else its eos token, else its pad token), which is not itself scored. A text
longer than the window (`eval.max_tokens`, capped at the model's context) is scored in consecutive windows that
overlap by one token, so every token is predicted exactly once, with at most one window of context.
"""

from __future__ import annotations

import math
from typing import Sequence

from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate.scoring import max_positions, sequence_logprobs


def start_token_id(tokenizer) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return int(token_id)
    raise GrpoKdError(f"tokenizer {tokenizer.name_or_path!r} has no bos, eos or pad token to start a text with")


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Split `ids` into windows of at most `size` tokens that overlap by one: each predicts size-1 new tokens."""
    if size < 2:
        raise GrpoKdError(f"perplexity window must hold at least 2 tokens, got {size}")
    ids = list(ids)
    if len(ids) <= size:
        return [ids]
    step = size - 1
    return [ids[start : start + size] for start in range(0, len(ids) - 1, step)]


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int = 1024) -> dict:
    """Per-token and per-byte NLL of `texts` under `model` (see the module docstring for the definitions)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise GrpoKdError("perplexity: no non-empty held-out text")
    size = min(max_tokens, max_positions(model))
    start = start_token_id(tokenizer)
    sequences: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        sequences.extend(windows([start, *ids], size))
    token_logprobs = sequence_logprobs(
        model, sequences, pad_id=tokenizer.pad_token_id, batch_size=batch_size, description="perplexity"
    )
    total_nll = -sum(float(lp.double().sum()) for lp in token_logprobs)
    num_tokens = sum(len(lp) for lp in token_logprobs)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nll_per_token = total_nll / max(num_tokens, 1)
    nll_per_byte = total_nll / num_bytes
    return {
        "num_texts": len(texts),
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "nll_per_token": nll_per_token,
        "perplexity": math.exp(min(nll_per_token, 700.0)),
        "nll_per_byte": nll_per_byte,
        "bits_per_byte": nll_per_byte / math.log(2),
        "bytes_per_token": num_bytes / max(num_tokens, 1),
        "window_tokens": size,
    }
