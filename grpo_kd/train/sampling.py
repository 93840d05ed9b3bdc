"""The rollout sampler: batched ancestral sampling from the student, optionally mixed with a teacher (MiniLLM).

One call samples one batch of rows (a row is one prompt's copy for one completion; the rollout phase lays out
`batch_size` prompts x `G` samples). Prompts are left-padded, so every row's next token sits in the last
column; `position_ids` count real tokens only, so a padded row sees the positions it would see alone; each
model keeps its own KV cache and every step computes only the last position's logits,
`(R, V)`, never `(R, T, V)`. Rows that have finished leave the batch (every model's KV cache is cut down to the
rows still sampling), so a batch costs what its unfinished rows cost.

Key design choice: **counter-based randomness per row.** Each row carries its own seed (the rollout phase
derives it from the run seed, the iteration, the group id and the sample index) and draws its `max_new_tokens`
uniforms from its own `torch.Generator` on the CPU; a token is drawn by inverting the CDF of the (truncated)
distribution at that row's uniform for that step. So a completion depends only on its own seed and the model,
not on the batch size, on the other rows of its batch, on the shard layout, nor on the device. Batched and
unbatched sampling then give the same tokens unless a row's probabilities move, with padding, by float rounding
across a CDF boundary at its uniform (a chance of order 1e-6 per token on float32).

The distribution a token is drawn from, with `z = softcap * tanh(x / softcap) / temperature` (the kernels'
transform; softcap only for Gemma-style heads):

    q = softmax(z_student)                         p = softmax(z_teacher)
    pi = alpha * p + (1 - alpha) * q              (pi = q when alpha = 0; the teacher is not run)
    pi_trunc = top_p(top_k(pi)), renormalised     (truncation acts on the mixture)

`Sample.sampling_logprobs` holds log pi(token), the *untruncated* distribution, as computed in the KV-cache
loop. The rollout phase stores recomputed values (`completion_logprobs`, one full forward, the same kernel as
the update phase); these in-loop values are a cross-check of the two paths (equal up to float rounding in
float32; on bf16 weights the two forwards differ by bf16 noise, as vLLM and HF generate differ from a training
forward in TRL).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from grpo_kd.errors import GrpoKdError
from grpo_kd.models import lm_head, position_ids_from_mask


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    teacher_mix_alpha: float = 0.0  # MiniLLM: draw from alpha * p_teacher + (1 - alpha) * q_student

    def check(self) -> None:
        """One-line `GrpoKdError` for a value no sampler could use."""
        if self.max_new_tokens < 1:
            raise GrpoKdError(f"rollout.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise GrpoKdError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GrpoKdError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GrpoKdError(f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.teacher_mix_alpha <= 1:
            raise GrpoKdError(f"rollout.teacher_mix_alpha must be in [0, 1], got {self.teacher_mix_alpha}")

    def as_dict(self) -> dict:
        return asdict(self)


class Sample(NamedTuple):
    completion_ids: list[int]  # (C,) sampled tokens, the eos included when finish_reason is "stop"
    finish_reason: str  # "stop" (an eos was sampled) or "length" (max_new_tokens reached)
    sampling_logprobs: list[float]  # (C,) log pi(token) of the untruncated distribution, from the KV-cache loop


# ---------------------------------------------------------------------------------------------- one model


def _hf_decoder(model):
    """The decoder stack (without the LM head) of a transformers model, under a peft wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Stepper:
    """One model's incremental decoding state: its KV cache, attention mask and next positions."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.decoder = _hf_decoder(model)
        self.head = lm_head(model)
        device = _device(model)
        self.mask = attention_mask.to(device)  # (R, P) 1 on real tokens
        positions = position_ids_from_mask(self.mask)  # (R, P) counts real tokens only, pads at 0
        self.next_position = positions[:, -1:] + 1  # (R, 1)
        self.past = None
        # transformers 5 names the KV cache `cache` (the old name `past_key_values` warns, then goes)
        self.cache_name = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        self.logits = self._forward(input_ids.to(device), positions)  # (R, V)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self.cache_name: self.past},
        )
        self.past = out[self.cache_name] if self.cache_name in out else out.past_key_values
        hidden = out.last_hidden_state[:, -1].to(self.head.weight.device)  # (R, H) last position only
        logits = F.linear(hidden, self.head.weight, self.head.bias).float()  # (R, V)
        if self.head.softcap is not None:
            logits = self.head.softcap * torch.tanh(logits / self.head.softcap)
        return logits

    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row, `(R,)`; afterwards `self.logits` predicts the next one."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)  # (R, P + t)
        self.logits = self._forward(tokens.to(device).unsqueeze(1), self.next_position)  # (R, V)
        self.next_position = self.next_position + 1

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (R',) of the batch: the KV cache, mask, positions and logits lose the others."""
        index = rows.to(self.mask.device)
        self.mask, self.next_position = self.mask[index], self.next_position[index]  # (R', P + t), (R', 1)
        self.logits = self.logits[rows.to(self.logits.device)]  # (R', V)
        if hasattr(self.past, "reorder_cache"):  # a transformers Cache: each layer's keys and values, by batch row
            self.past.reorder_cache(index)
        else:  # the legacy tuple of (keys, values) per layer
            self.past = tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in self.past)


# ---------------------------------------------------------------------------------------------- distributions


def mixture_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, temperature: float, alpha: float
) -> torch.Tensor:
    """pi = alpha * softmax(teacher / T) + (1 - alpha) * softmax(student / T), float32 `(R, V)`."""
    scale = (lambda z: z) if temperature == 1.0 else (lambda z: z / temperature)  # x / 1.0 == x: one pass saved
    probs = torch.softmax(scale(student_logits), dim=-1)  # (R, V)
    if teacher_logits is None or alpha == 0:
        return probs
    teacher_probs = torch.softmax(scale(teacher_logits.to(probs.device)), dim=-1)  # (R, V)
    return alpha * teacher_probs + (1 - alpha) * probs


def truncate(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-k, then outside the smallest nucleus of mass `top_p` (not renormalised).

    probs: (R, V) -> (R, V). The most likely token is always kept; ties at the k-th value are kept.
    """
    if 0 < top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]  # (R, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (R, V)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (R, V) mass of the more likely tokens
        keep_sorted = mass_before < top_p * sorted_probs.sum(-1, keepdim=True)  # (R, V)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (R, V) back in vocabulary order
        probs = probs.masked_fill(~keep, 0.0)
    return probs


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds `u` for each row: weights (R, V) >= 0, uniforms (R,) in [0, 1) -> (R,).

    The CDF is accumulated in float64; a token of weight 0 is never chosen.
    """
    cdf = torch.cumsum(weights, -1, dtype=torch.float64)  # (R, V), each weight widened before the sum
    target = uniforms.to(cdf) * cdf[:, -1]  # (R,)
    tokens = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)  # (R,)
    return tokens.clamp_(max=weights.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------- the loop


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (R, P), attention_mask (R, P)) with each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (R, P)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (R, P)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GrpoKdError(f"row {row} has an empty prompt; every prompt needs at least one token")
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """`(R, steps)` uniforms in [0, 1), row r from its own CPU generator seeded with `seeds[r]`."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows)  # (R, steps)


# A finished row stays in the batch (fed padding, its outputs ignored) until this share of the rows has finished;
# then the finished rows are cut out of every model's KV cache. Cutting copies each cache once, about what one
# decoding step reads, so it waits for a few rows rather than paying that for every single one.
COMPACT_FRACTION = 0.125


@torch.no_grad()
def sample_batch(
    student,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    params: SamplingParams,
    *,
    eos_ids: set[int],
    pad_id: int,
    teacher=None,
    teacher_prompts: Sequence[Sequence[int]] | None = None,
) -> list[Sample]:
    """Sample one completion per row of `prompts` (token id lists), row r with randomness from `seeds[r]`.

    With `params.teacher_mix_alpha > 0`, `teacher` (same vocabulary) runs beside the student with its own KV
    cache and tokens are drawn from the mixture; `teacher_prompts` are the teacher's own prompt ids of each row
    (its chat format), else it reads the student's. This is the main loop of the phase: one prefill, then one
    single-token step per new token until every row has sampled an eos or `max_new_tokens` tokens. Rows that
    have finished are dropped from the batch (`COMPACT_FRACTION`), which changes no row's tokens: each row
    draws from its own uniforms and sees only its own cache.
    """
    params.check()
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    alpha = params.teacher_mix_alpha
    if alpha > 0 and teacher is None:
        raise GrpoKdError("rollout.teacher_mix_alpha > 0 needs a teacher to mix with")
    input_ids, attention_mask = left_pad(prompts, pad_id)  # (R, P), (R, P)
    uniforms = row_uniforms(seeds, params.max_new_tokens)  # (R, N)
    models = [_Stepper(student, input_ids, attention_mask)]
    if alpha > 0:
        if teacher_prompts is not None and len(teacher_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(teacher_prompts)} teacher prompts")
        models.append(_Stepper(teacher, *(left_pad(teacher_prompts, pad_id) if teacher_prompts is not None
                                          else (input_ids, attention_mask))))
        if models[1].logits.shape[-1] != models[0].logits.shape[-1]:
            raise GrpoKdError(f"teacher-mixed sampling: the teacher has {models[1].logits.shape[-1]} logits per token "
                              f"but the student {models[0].logits.shape[-1]}")
    device = models[0].logits.device
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)  # (E,)
    rows = len(prompts)
    tokens_out = torch.full((rows, params.max_new_tokens), pad_id, dtype=torch.long, device=device)  # (R, N)
    logprobs_out = torch.zeros((rows, params.max_new_tokens), dtype=torch.float32, device=device)  # (R, N)
    lengths = torch.full((rows,), params.max_new_tokens, dtype=torch.long, device=device)  # (R,)
    stopped_rows = torch.zeros(rows, dtype=torch.bool, device=device)  # (R,) an eos was sampled
    uniforms = uniforms.to(device)
    active = torch.arange(rows, device=device)  # (A,) the row of `prompts` each batch row is
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # (A,) finished, still in the batch
    for step in range(params.max_new_tokens):
        teacher_logits = models[1].logits if alpha > 0 else None
        probs = mixture_probs(models[0].logits, teacher_logits, params.temperature, alpha)  # (A, V)
        tokens = inverse_cdf(truncate(probs, params.top_k, params.top_p), uniforms[active, step])  # (A,)
        tokens = torch.where(done, pad_id, tokens)  # (A,) finished rows only carry padding
        tokens_out[active, step] = tokens
        logprobs_out[active, step] = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()
        stopped = ~done & torch.isin(tokens, eos)  # (A,) rows whose eos is this token
        lengths[active[stopped]] = step + 1
        stopped_rows[active[stopped]] = True
        done = done | stopped
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        if int(done.sum()) >= max(1, COMPACT_FRACTION * len(done)):
            keep = (~done).nonzero().squeeze(1)  # (A',) rows still sampling
            active, done, tokens = active[keep], done[keep], tokens[keep]
            for model in models:
                model.keep(keep)
        for model in models:
            model.step(tokens)
    return _samples(tokens_out.cpu(), logprobs_out.cpu(), lengths.cpu(), stopped_rows.cpu())


def _samples(
    tokens: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor
) -> list[Sample]:
    """Per-row `Sample`s from the (R, N) token and log-prob buffers cut at each row's length."""
    samples = []
    for row in range(len(tokens)):
        n = int(lengths[row])
        samples.append(Sample(tokens[row, :n].tolist(), "stop" if bool(stopped[row]) else "length",
                              logprobs[row, :n].tolist()))
    return samples
