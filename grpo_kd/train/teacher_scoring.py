"""Scoring rollout shards with one loaded model: the teacher pass's inputs, batches and cache rows.

    scorer = Scorer(cfg, teacher, teacher_tokenizer, spec)
    for index, scored_rows, fresh in scorer.score_shard(shard, reference_logprobs, progress=True, done=kept): ...

Per shard: rows sorted by length (stable), cut into batches of at most `teacher.token_budget` padded tokens;
for each batch `final_hidden_states` (the LM head never runs) and then, on the completion positions only,
`linear_topk` (top-k ids and log-probs and the exact sampled-token log-prob), optionally m samples from the
teacher with their log-probs (`teacher_samples.py`). Alignment: completion token t sits at position P + t of
`prompt + completion` and is predicted by the hidden state at P + t - 1 (`grpo_kd.cache.reader.completion_hidden`).
The prompt the model is conditioned on is rebuilt for the privileged self-teacher and for a teacher with another
tokenizer. A teacher with another tokenizer (an `Aligner`, grpo_kd/xtok.py) reads its own tokens of the prompt in
its own format, the completion text and its end of turn, tokenized together; its log-probs are then summed onto the
student's tokens by the alignment rule (`target_logprobs`), with the alignment records beside them. The phase (which shards, the reference pass, resuming, writing) is `teacher_pass.py`; the vLLM engine
(`grpo_kd.engines.vllm_teacher`) reuses this class's inputs, batches and row assembly with its own forward.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from grpo_kd.cache.reader import completion_hidden
from grpo_kd.cache.rollouts import RolloutShard
from grpo_kd.cache.spec import CacheSpec, ScoredRows, bf16_bits
from grpo_kd.cache.values import row_sums
from grpo_kd.config import Config
from grpo_kd.data import Prompt, prompt_token_ids, render_prompt, teacher_chat_template, teacher_has_own_prompt
from grpo_kd.kernels import linear_logprobs, linear_topk
from grpo_kd.models import (
    final_hidden_states,
    lm_head,
)
from grpo_kd.progress import counter
from grpo_kd.train.teacher_samples import sample_teacher
from grpo_kd.xtok import Aligner, RowAlignment

log = logging.getLogger(__name__)


class Scorer:
    """One loaded model scoring rollout shards batch by batch (see the module doc)."""

    def __init__(self, cfg: Config, model, tokenizer, spec: CacheSpec, reference: bool = False,
                 aligner: Aligner | None = None):
        self.model = model
        self.head = lm_head(model)
        self.temperature = 1.0 if reference else cfg.teacher.temperature
        cap = cfg.teacher.softcap if not reference else None
        self.softcap = cap if cap is not None else self.head.softcap
        self.device = model.get_input_embeddings().weight.device
        self.set_inputs(cfg, tokenizer, spec, reference, aligner)

    def set_inputs(self, cfg: Config, tokenizer, spec: CacheSpec, reference: bool, aligner: Aligner | None) -> None:
        """What the inputs depend on (shared with the vLLM scorer, which has no model of its own here)."""
        self.cfg, self.tokenizer, self.spec, self.reference = cfg, tokenizer, spec, reference
        self.aligner = None if reference else aligner  # a teacher with another tokenizer
        self.alignments: dict[int, list[RowAlignment]] = {}  # per shard, per row, while the shard is scored
        self.privileged = (not reference) and cfg.teacher.kind == "self_privileged"
        self.chat = teacher_chat_template(cfg)
        self.own_prompt = (not reference) and teacher_has_own_prompt(cfg)

    # -- inputs
    def _inputs(self, shard: RolloutShard) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(prompt ids, completion ids) per row, as the model reads them: with an aligner, the teacher's own tokens of
        the prompt and of the completion text with its end of turn (each row's alignment kept for `_scored_rows`)."""
        if self.aligner is None:
            return self._prompts(shard), self._completions(shard)
        offsets, values = shard.list_column("completion_ids")
        finished = [reason == "stop" for reason in shard.table.column("finish_reason").to_pylist()]
        rows = [self.aligner.align(text, values[offsets[i]:offsets[i + 1]], finished[i])
                for i, text in enumerate(self._prompt_texts(shard))]
        self.alignments[shard.shard] = rows
        return [r.teacher_prompt for r in rows], [r.teacher_completion for r in rows]

    def _prompt_texts(self, shard: RolloutShard) -> list[str]:
        """Each row's prompt rendered in the model's own format (its chat template, if it reads one)."""
        texts = shard.table.column("prompt_text").to_pylist()
        ids = shard.table.column("prompt_id").to_pylist()
        return [render_prompt(self.tokenizer, Prompt(pid, text), chat_template=self.chat) for pid, text in zip(ids, texts)]

    def _prompts(self, shard: RolloutShard) -> list[np.ndarray]:
        """Prompt ids the model is conditioned on, per row: the student's, or rebuilt from the prompt text in the
        teacher's own format (`grpo_kd.data.teacher_has_own_prompt`, or another tokenizer)."""
        offsets, values = shard.list_column("prompt_ids")
        if not self.own_prompt:
            return [values[offsets[i]:offsets[i + 1]] for i in range(shard.num_rows)]
        texts = shard.table.column("prompt_text").to_pylist()
        privileged = shard.table.column("privileged").to_pylist()
        ids = shard.table.column("prompt_id").to_pylist()
        template = self.cfg.teacher.prompt_template if self.privileged else None
        return [np.asarray(prompt_token_ids(self.tokenizer, Prompt(pid, text, priv), chat_template=self.chat,
                                            privileged_template=template), np.int64)
                for pid, text, priv in zip(ids, texts, privileged)]

    def _completions(self, shard: RolloutShard) -> list[np.ndarray]:
        offsets, values = shard.list_column("completion_ids")
        return [values[offsets[i]:offsets[i + 1]] for i in range(shard.num_rows)]

    def _batches(self, prompts, completions) -> list[np.ndarray]:
        lengths = np.array([len(p) + len(c) for p, c in zip(prompts, completions)], np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory shows at once
        batches, current, longest = [], [], 0
        for i in order.tolist():
            if current and (len(current) + 1) * max(longest, lengths[i]) > self.cfg.teacher.token_budget:
                batches.append(np.array(current))
                current, longest = [], 0
            current.append(i)
            longest = max(longest, int(lengths[i]))
        return batches + ([np.array(current)] if current else [])

    @torch.no_grad()
    def _hidden(self, prompts, completions, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Flat completion hidden states (N, H), their target ids (N,), and C per row, in `rows` order."""
        P = np.array([len(prompts[i]) for i in rows], np.int64)
        C = np.array([len(completions[i]) for i in rows], np.int64)
        L, T = int((P + C).max()), int(C.max(initial=0))
        ids = np.zeros((len(rows), L), np.int64)
        for b, i in enumerate(rows):
            ids[b, :P[b]] = prompts[i]
            ids[b, P[b]:P[b] + C[b]] = completions[i]
        input_ids = torch.from_numpy(ids).to(self.device)  # (B, L)
        mask = torch.from_numpy(np.arange(L)[None, :] < (P + C)[:, None]).to(self.device)  # (B, L)
        hidden = final_hidden_states(self.model, input_ids, mask.long())  # (B, L, H)
        P_t = torch.from_numpy(P)
        h = completion_hidden(hidden, P_t, T)  # (B, T, H)
        keep = torch.from_numpy(np.arange(T)[None, :] < C[:, None]).to(h.device)  # (B, T)
        targets = torch.from_numpy(ids).to(h.device).gather(1, (P_t[:, None] + torch.arange(T)[None, :])
                                                            .clamp(max=L - 1).to(h.device))  # (B, T)
        weight = self.head.weight
        return h[keep].to(weight.device), targets[keep].to(weight.device), C  # (N, H), (N,)

    def _loop(self, shard: RolloutShard, label: str, progress: bool,
              kept: dict[int, np.ndarray] | None = None) -> Iterator[
            tuple[int, np.ndarray, torch.Tensor | None, torch.Tensor | None, np.ndarray]]:
        """(batch index, rows, hidden states (N, H), target ids (N,), C per row) per batch. A batch whose index
        and rows are in `kept` ({index: rows} of batches scored earlier) gets no forward pass: None, None."""
        prompts, completions = self._inputs(shard)
        batches = self._batches(prompts, completions)
        total = int(sum(len(c) for c in completions))
        with counter(label, total, "tokens", enabled=progress) as advance:
            for n, rows in enumerate(batches):
                if kept and n in kept and np.array_equal(kept[n], rows):
                    C = np.array([len(completions[i]) for i in rows], np.int64)
                    yield n, rows, None, None, C
                else:
                    if kept and n in kept:
                        log.warning("shard %d: kept batch %d holds other rows; scoring it again", shard.shard, n)
                    h, targets, C = self._hidden(prompts, completions, rows)
                    yield n, rows, h, targets, C
                advance(int(C.sum()))

    def reference_logprobs(self, shard: RolloutShard, progress: bool,
                           kept: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                           keep=None) -> tuple[list[np.ndarray], int]:
        """([R] (C,) float32 log-probs per row, tokens scored now). A batch in `kept` ({index: (rows, (N,)
        log-probs)} from an interrupted run) with exactly that batch's rows is reused; `keep(index, rows,
        logprobs)` is called after each batch scored now."""
        kept = kept or {}
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * shard.num_rows
        scored = 0
        label = f"reference  shard {shard.shard}"
        for n, rows, h, targets, C in self._loop(shard, label, progress, {n: r for n, (r, _) in kept.items()}):
            if h is None:
                values = kept[n][1]
            else:
                values = self._sampled_logprobs(h, targets)  # (N,)
                scored += int(C.sum())
                if keep is not None:
                    keep(n, rows, values)
            for i, part in zip(rows, np.split(values, np.cumsum(C)[:-1])):
                out[i] = part
        return out, scored

    def score_shard(self, shard: RolloutShard, ref: list[np.ndarray] | None, progress: bool,
                    done: dict[int, ScoredRows] | None = None) -> Iterator[tuple[int, ScoredRows, bool]]:
        """(batch index, ScoredRows, scored now?) per batch, in the batch order (longest rows first). A batch in
        `done` (kept from an interrupted run) is passed through without a forward pass when it holds exactly that
        batch's rows, and scored again otherwise."""
        done = done or {}
        kept = {n: scored.row for n, scored in done.items()}
        for n, rows, h, targets, C in self._loop(shard, f"teacher    shard {shard.shard}", progress, kept):
            if h is None:
                yield n, done[n], False
                continue
            if self.spec.token_level:
                token = self._token_fields(h, targets, (self.cfg.seed, shard.shard, n))
                target = token["target_logprobs"]
            else:
                token, target = {}, self._sampled_logprobs(h, targets)
            yield n, self._scored_rows(shard, rows, C, token, target, ref), True

    def _token_fields(self, h: torch.Tensor, targets: torch.Tensor, seed_key: tuple) -> dict[str, np.ndarray]:
        """topk_ids, topk_logprobs, target_logprobs (and the m samples) of one batch's (N, H) hidden states."""
        ids, logprobs, _, target = linear_topk(h, self.head.weight, self.spec.top_k, bias=self.head.bias,
                                               temperature=self.temperature, softcap=self.softcap,
                                               target_ids=targets)
        token = {"topk_ids": ids.to(torch.int32).cpu().numpy(), "topk_logprobs": self._stored_topk(logprobs),
                 "target_logprobs": target.float().cpu().numpy()}
        if self.spec.num_samples:
            seed = hash(seed_key) % 2**31
            token["sample_ids"], token["sample_weights"], token["sample_logprobs"] = sample_teacher(
                h, self.head.weight, self.head.bias, self.spec.num_samples, temperature=self.temperature,
                softcap=self.softcap, seed=seed)
        return token

    def _stored_topk(self, logprobs: torch.Tensor) -> np.ndarray:
        """(N, k) top-k log-probs in the cache's storage dtype (float16, or bfloat16 bits)."""
        if self.spec.logprob_dtype == "float16":
            return logprobs.to(torch.float16).cpu().numpy()
        return bf16_bits(logprobs)

    def _sampled_logprobs(self, h: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """(N,) float32 log-probs of the scored tokens: the reference's at temperature 1, else the teacher's."""
        if self.reference:
            logprobs, _, _ = linear_logprobs(h, self.head.weight, targets, bias=self.head.bias)
        else:
            logprobs, _, _ = linear_logprobs(h, self.head.weight, targets, bias=self.head.bias,
                                             temperature=self.temperature, softcap=self.softcap)
        return logprobs.float().cpu().numpy()

    def _scored_rows(self, shard: RolloutShard, rows: np.ndarray, C: np.ndarray, token: dict[str, np.ndarray],
                     target: np.ndarray, ref: list[np.ndarray] | None) -> ScoredRows:
        """One batch's ScoredRows from its token fields and the (N,) log-probs of its scored tokens (C per row)."""
        extra = None
        if self.aligner is not None:
            token, extra = self._aligned_fields(shard, rows, C, target)
        if self.spec.reference:
            token["ref_logprobs"] = np.concatenate([ref[i] for i in rows]) if len(rows) else np.zeros(0)
        group_ids = shard.table.column("group_id").to_numpy()
        return ScoredRows(row=rows.astype(np.int64), group_id=group_ids[rows].astype(np.int64),
                          num_tokens=shard.lengths()[rows].astype(np.int32), seq_logprob=row_sums(target, C),
                          token=token, extra=extra)

    def _aligned_fields(self, shard: RolloutShard, rows: np.ndarray, C: np.ndarray,
                        target: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The teacher's (N_T,) log-probs of its own tokens, C_T per row -> per student token (token fields) and
        the per-row counts (row fields), by each row's alignment."""
        aligned = [self.alignments[shard.shard][int(i)] for i in rows]
        parts = np.split(target, np.cumsum(C)[:-1])  # [R] (C_T,) each
        token = {"target_logprobs": np.concatenate([a.student_values(p) for a, p in zip(aligned, parts)]),
                 "xtok_bytes": np.concatenate([a.student_bytes for a in aligned]),
                 "xtok_teacher_tokens": np.concatenate([a.teacher_counts() for a in aligned]),
                 "xtok_straddled": np.concatenate([a.straddled for a in aligned])}
        extra = {"xtok_num_tokens": C.astype(np.int32),
                 "xtok_num_bytes": np.array([a.text_bytes for a in aligned], np.int64)}
        return token, extra
