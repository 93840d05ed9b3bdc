"""The student's log-probs of its completions, computed one way for every phase.

The rollout phase records behaviour log-probs with `completion_logprobs`, and the update phase recomputes them
with the same function (same padding, same temperature, same kernel), so that the importance ratio of the
first optimisation step is exactly 1 up to float rounding — the invariant GRPO's clipping relies on.

Batches are right-padded `[prompt | completion]` rows. Row b's completion token t sits at column P_b + t and is
predicted by the hidden state at column P_b + t - 1, so the completion hidden states are one gather (the same
`completion_hidden` the teacher pass and the update use) and the LM head never runs over the prompt (nor over
the vocabulary: the fused kernels take hidden states and the head's weight).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from grpo_kd.cache.reader import completion_hidden as gather_completion_hidden
from grpo_kd.kernels import linear_logprobs
from grpo_kd.models import final_hidden_states, lm_head


class CompletionBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, L) prompt then completion, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    completion_ids: torch.Tensor  # (B, T) right-padded with 0
    completion_mask: torch.Tensor  # (B, T) 1.0 on real completion tokens
    prompt_lengths: torch.Tensor  # (B,) P_b: completion token t is predicted by column P_b + t - 1

    def to(self, device: torch.device | str) -> "CompletionBatch":
        return CompletionBatch(*(t.to(device) for t in self))


def collate(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int = 0
) -> CompletionBatch:
    """Right-pad `[prompt | completion]` rows. Every prompt needs at least one token."""
    rows = [list(map(int, p)) + list(map(int, c)) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    steps = max(1, max(len(c) for c in completions))
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    completion_ids = torch.zeros((batch, steps), dtype=torch.long)
    completion_mask = torch.zeros((batch, steps), dtype=torch.float32)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        if len(prompt) == 0:
            raise ValueError(f"row {b} has an empty prompt: the first completion token needs a context")
        n_completion = len(completion)
        input_ids[b, : len(rows[b])] = torch.tensor(rows[b])
        attention_mask[b, : len(rows[b])] = 1
        completion_ids[b, :n_completion] = torch.tensor(list(map(int, completion)), dtype=torch.long)
        completion_mask[b, :n_completion] = 1.0
    return CompletionBatch(input_ids, attention_mask, completion_ids, completion_mask, prompt_lengths)


def completion_hidden(model, batch: CompletionBatch) -> torch.Tensor:
    """Final hidden states at the positions that predict each completion token, `(B, T, H)`."""
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)  # (B, L, H)
    return gather_completion_hidden(hidden, batch.prompt_lengths, batch.completion_ids.shape[1])  # (B, T, H)


def completion_logprobs(
    model,
    batch: CompletionBatch,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the completion tokens under `model`, `(B, T)` (0 on padding), and optionally the entropy."""
    hidden = completion_hidden(model, batch)  # (B, T, H)
    head = lm_head(model)
    logprobs, _, entropy = linear_logprobs(
        hidden,
        head.weight,
        batch.completion_ids,
        bias=head.bias,
        temperature=temperature,
        softcap=head.softcap,
        return_entropy=return_entropy,
        impl=impl,
    )
    mask = batch.completion_mask.to(logprobs.dtype)
    logprobs = logprobs * mask
    entropy = entropy * mask if entropy is not None else None
    return logprobs, entropy
