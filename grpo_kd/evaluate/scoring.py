"""Log-probabilities of given tokens under a model, from hidden states and the LM head, never full logits.

Every scorer in `grpo_kd.evaluate` (perplexity, the teacher's score of the student's samples) goes through
`sequence_logprobs`: it pads a batch of token sequences on the right, runs the decoder without its head
(`models.final_hidden_states`) and turns the hidden states into the log-probabilities of the next tokens
through the fused `kernels.linear_logprobs` (Triton on a GPU, its chunked torch twin on the CPU), so a 256k
vocabulary never becomes a `B x T x V` tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch

from grpo_kd.cache.reader import completion_hidden
from grpo_kd.progress import progress
from grpo_kd.models import final_hidden_states, lm_head


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def max_positions(model, default: int = 2048) -> int:
    """The longest sequence the model takes (from its config), or `default` when it does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T), attention mask (B, T)), padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def head_logprobs(hidden: torch.Tensor, model, targets: torch.Tensor) -> torch.Tensor:
    """log q(targets | hidden) through the fused kernel: hidden (N, H), targets (N,) -> (N,) float32."""
    from grpo_kd.kernels import linear_logprobs

    head = lm_head(model)
    logprobs, _, _ = linear_logprobs(hidden, head.weight, targets, bias=head.bias, softcap=head.softcap)
    return logprobs.float()


@torch.no_grad()
def sequence_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    description: str = "scoring",
) -> list[torch.Tensor]:
    """For each sequence s, log p(s[t] | s[:t]) for t = 1 .. len(s)-1, as a float32 CPU tensor (len(s)-1,).

    Sequences are batched by length (longest first) so that padding stays small; results come back in order.
    """
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[torch.Tensor | None] = [None] * len(sequences)
    for start in progress(range(0, len(order), batch_size), description=description):
        rows = order[start : start + batch_size]
        ids, mask = pad_right([sequences[i] for i in rows], pad_id)  # (B, T)
        ids, mask = ids.to(device), mask.to(device)
        hidden = final_hidden_states(model, ids, mask)[:, :-1]  # (B, T-1, H) predicts ids[:, 1:]
        targets = ids[:, 1:]  # (B, T-1)
        valid = mask[:, 1:].bool()  # (B, T-1)
        logprobs = head_logprobs(hidden[valid], model, targets[valid])  # (n_valid,)
        lengths = valid.sum(dim=1).tolist()
        for row, chunk in zip(rows, torch.split(logprobs.cpu(), lengths)):
            results[row] = chunk
    return [r if r is not None else torch.zeros(0) for r in results]


@torch.no_grad()
def completion_hidden_states(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    description: str = "hidden states",
) -> list[torch.Tensor]:
    """For each (prompt p, completion c): the final hidden states that predict c, shape (len(c), H), on CPU.

    Row j is the state after p + c[:j] (the rule of `grpo_kd.cache.reader.completion_hidden`, shared with the
    training phases).
    """
    device = model_device(model)
    results: list[torch.Tensor] = []
    for start in progress(range(0, len(prompts), batch_size), description=description):
        batch_p, batch_c = prompts[start : start + batch_size], completions[start : start + batch_size]
        ids, mask = pad_right([list(p) + list(c) for p, c in zip(batch_p, batch_c)], pad_id)  # (B, L)
        hidden = final_hidden_states(model, ids.to(device), mask.to(device))  # (B, L, H)
        prompt_lengths = torch.tensor([len(p) for p in batch_p])  # (B,)
        gathered = completion_hidden(hidden, prompt_lengths, max(len(c) for c in batch_c))  # (B, T, H)
        results.extend(gathered[row, : len(c)].float().cpu() for row, c in enumerate(batch_c))  # (C, H) each
    return results
