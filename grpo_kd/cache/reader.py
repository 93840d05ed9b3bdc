"""The training reader: whole groups of rollouts with their teacher-cache fields, as padded torch tensors.

    reader = CacheReader.open(run.rollouts(1), run.teacher(1), student_vocab=tokenizer_fingerprint(tok),
                              require_token_level=True)
    for batch in reader.batches(token_budget=16384, shuffle=True, seed=step_seed, prefetch=2):
        ...  # batch: CacheBatch, see below
    batch = reader.batch([0, 5, 7])        # groups by index (0 .. reader.num_groups - 1)

Key design choices:
- A batch is made of whole groups (all G completions of a prompt), so group-relative advantages never need
  rows from another batch; `plan()` cuts batches by a group count or by a padded-token budget.
- Both the rollout store and an Arrow cache are memory-mapped: building a batch is one copy of each row's
  slice into the padded array. `batches()` builds the next batches in a background thread (`prefetch` deep).
- `open` refuses a cache that does not fit: a token-level cache whose teacher vocabulary is not the student's
  (the message names both: size and hash prefix), a cache aligned onto another student's tokens, a cache made
  from other rollouts (checksum), missing shards.

Alignment: completion token t of row b is `completion_ids[b, t] = input_ids[b, prompt_lengths[b] + t]`, and
the student's hidden state that predicts it is at position `prompt_lengths[b] + t - 1` (`completion_hidden`).
Every teacher field at [b, t] describes that same token; with a teacher of another vocabulary `teacher_logprobs`
holds its log-prob aligned onto that token's bytes (grpo_kd/xtok.py), and there is no top-k.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from grpo_kd.cache.manifest import CacheError, check_same_vocab, describe_vocab, rebuild_command, same_vocab
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cache.spec import stored_logprobs_as_float32
from grpo_kd.cache.teacher import TeacherShard, check_alignment, open_teacher_shards
from grpo_kd.cache.values import describe_bad, first_bad


class CacheBatch(NamedTuple):
    """B rows (whole groups, contiguous), L = longest prompt + completion, T = longest completion.

    Padding: ids 0, log-probs 0, masks False. Teacher fields are None when the cache lacks them.
    """

    index: torch.Tensor  # (B,) int64 global rollout row: RolloutStore[index[b]]
    group_ids: torch.Tensor  # (B,) int64 the prompt's group id; equal ids are adjacent
    input_ids: torch.Tensor  # (B, L) int64 prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, L) bool
    prompt_lengths: torch.Tensor  # (B,) int64
    completion_ids: torch.Tensor  # (B, T) int64
    completion_mask: torch.Tensor  # (B, T) bool
    old_logprobs: torch.Tensor  # (B, T) float32 behaviour log-probs (the sampling distribution)
    student_logprobs: torch.Tensor | None  # (B, T) float32 student's own log-probs (teacher-mixed sampling)
    finished: torch.Tensor  # (B,) bool finish_reason == "stop"
    teacher_topk_ids: torch.Tensor | None  # (B, T, k) int64 sorted by teacher log-prob, descending
    teacher_topk_logprobs: torch.Tensor | None  # (B, T, k) float32, normalised over the full vocabulary
    teacher_logprobs: torch.Tensor | None  # (B, T) float32 teacher log-prob of the sampled token (exact, or aligned)
    teacher_sample_ids: torch.Tensor | None  # (B, T, m) int64 tokens drawn from the teacher
    teacher_sample_weights: torch.Tensor | None  # (B, T, m) float32, sum to 1 over m (padding weight 0)
    teacher_sample_logprobs: torch.Tensor | None  # (B, T, m) float32 teacher log-probs at those ids (full vocab)
    ref_logprobs: torch.Tensor | None  # (B, T) float32 reference-model log-probs
    teacher_seq_logprob: torch.Tensor | None  # (B,) float64 summed teacher log-prob of the completion
    teacher_seq_tokens: torch.Tensor | None  # (B,) int64 tokens in that sum (teacher tokens if cross-tokenizer)
    teacher_seq_bytes: torch.Tensor | None  # (B,) int64 UTF-8 bytes of the completion (cross-tokenizer only)
    sampler_logprobs: torch.Tensor | None = None  # (B, T) float32 the sampling engine's own (rollout.engine vllm)


_TOKEN_FIELDS = {  # cache field -> (batch field, numpy dtype of the padded array)
    "topk_ids": ("teacher_topk_ids", np.int64),
    "topk_logprobs": ("teacher_topk_logprobs", np.float32),
    "target_logprobs": ("teacher_logprobs", np.float32),
    "sample_ids": ("teacher_sample_ids", np.int64),
    "sample_weights": ("teacher_sample_weights", np.float32),
    "sample_logprobs": ("teacher_sample_logprobs", np.float32),
    "ref_logprobs": ("ref_logprobs", np.float32),
}


def completion_hidden(hidden: torch.Tensor, prompt_lengths: torch.Tensor, num_completion: int) -> torch.Tensor:
    """(B, L, H) hidden states -> (B, T, H): the states that predict completion tokens 0..T-1.

    Row b, token t is predicted by position prompt_lengths[b] + t - 1 (clamped into range for padding).
    """
    B, L, H = hidden.shape
    t = torch.arange(num_completion, device=hidden.device)  # (T,)
    pos = (prompt_lengths.to(hidden.device)[:, None] - 1 + t[None, :]).clamp(0, L - 1)  # (B, T)
    return hidden.gather(1, pos[:, :, None].expand(B, num_completion, H))  # (B, T, H)


class CacheReader:
    """Rollouts of one iteration plus (optionally) their teacher cache; see the module doc."""

    def __init__(self, store: RolloutStore, teacher: list[TeacherShard] | None):
        self.store = store
        self.teacher = {s.shard: s for s in teacher} if teacher else {}
        self.spec = teacher[0].spec if teacher else None
        self._groups = store.groups()
        self._shard_pos = {s.shard: i for i, s in enumerate(store.shards)}
        self._row_starts = np.cumsum([0] + [s.num_rows for s in store.shards])

    @classmethod
    def open(cls, rollouts_dir, teacher_dir=None, *, student_vocab: dict | None = None,
             require_token_level: bool = False) -> "CacheReader":
        store = RolloutStore.open(rollouts_dir)
        if teacher_dir is None:
            return cls(store, None)
        shards = open_teacher_shards(teacher_dir)
        check_alignment(store, shards)
        spec = shards[0].spec
        teacher_vocab = shards[0].manifest.get("teacher", {}).get("tokenizer")
        if spec.token_level and student_vocab is not None:
            check_same_vocab(teacher_vocab, student_vocab, f"the teacher cache in {teacher_dir}")
        if spec.cross_tokenizer and spec.alignment is None:
            raise CacheError(f"the teacher cache in {teacher_dir} holds sequence scores only (made before teachers of "
                             "another vocabulary were aligned per token); run cache-teacher again")
        if spec.alignment is not None and student_vocab is not None:
            aligned_to = shards[0].manifest.get("student", {}).get("tokenizer")
            if not same_vocab(aligned_to, student_vocab):
                raise CacheError(f"the teacher cache in {teacher_dir} was aligned onto the tokens of "
                                 f"{describe_vocab(aligned_to)} but the student has {describe_vocab(student_vocab)}; "
                                 "run cache-teacher for this student")
        if require_token_level and not spec.token_level:
            student_vocab = student_vocab or shards[0].manifest.get("student", {}).get("tokenizer")
            raise CacheError(f"the teacher cache in {teacher_dir} has no top-k over the student's vocabulary (teacher "
                             f"{describe_vocab(teacher_vocab)}, student {describe_vocab(student_vocab)}): this loss "
                             "needs the teacher's distribution over the student's tokens, so one shared vocabulary")
        return cls(store, shards)

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------------------------------- planning

    def group_lengths(self) -> np.ndarray:
        """(num_groups, 2): rows and longest prompt + completion of each group."""
        out = np.zeros((len(self._groups), 2), np.int64)
        for i, g in enumerate(self._groups):
            shard = self.store.shard(g.shard)
            total = shard.lengths("prompt_ids")[g.start:g.stop] + shard.lengths("completion_ids")[g.start:g.stop]
            out[i] = (g.size, total.max())
        return out

    def plan(self, *, groups_per_batch: int | None = None, token_budget: int | None = None,
             shuffle: bool = False, seed: int = 0) -> list[list[int]]:
        """Group indices per batch: a fixed group count, or as many groups as keep rows x longest <= budget."""
        order = np.arange(self.num_groups)
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        if (groups_per_batch is None) == (token_budget is None):
            raise CacheError("give exactly one of groups_per_batch and token_budget")
        if groups_per_batch is not None:
            return [order[i:i + groups_per_batch].tolist() for i in range(0, len(order), groups_per_batch)]
        sizes = self.group_lengths()
        batches, current, rows, longest = [], [], 0, 0
        for g in order.tolist():
            n, length = sizes[g]
            if current and (rows + n) * max(longest, length) > token_budget:
                batches.append(current)
                current, rows, longest = [], 0, 0
            current.append(g)
            rows, longest = rows + n, max(longest, length)
        return batches + ([current] if current else [])

    def batches(self, *, groups_per_batch: int | None = None, token_budget: int | None = None,
                shuffle: bool = False, seed: int = 0, prefetch: int = 2) -> Iterator[CacheBatch]:
        """Yield the planned batches, built `prefetch` ahead in a background thread."""
        plan = self.plan(groups_per_batch=groups_per_batch, token_budget=token_budget, shuffle=shuffle, seed=seed)
        return prefetched((lambda groups=groups: self.batch(groups) for groups in plan), prefetch)

    # ------------------------------------------------------------------------------------------- one batch

    def batch(self, groups: Sequence[int]) -> CacheBatch:
        """Whole groups `groups` (indices into 0..num_groups-1) as one padded batch."""
        slices = [self._groups[g] for g in groups]
        rows = [(g.shard, r) for g in slices for r in range(g.start, g.stop)]
        B = len(rows)
        prompts = [self._row_list(s, r, "prompt_ids") for s, r in rows]
        completions = [self._row_list(s, r, "completion_ids") for s, r in rows]
        P = np.array([len(p) for p in prompts], np.int64)
        C = np.array([len(c) for c in completions], np.int64)
        T, L = int(C.max(initial=0)), int((P + C).max(initial=0))
        input_ids = np.zeros((B, L), np.int64)
        completion_ids = np.zeros((B, T), np.int64)
        old = np.zeros((B, T), np.float32)
        for b, (s, r) in enumerate(rows):
            input_ids[b, :P[b]] = prompts[b]
            input_ids[b, P[b]:P[b] + C[b]] = completions[b]
            completion_ids[b, :C[b]] = completions[b]
            old[b, :C[b]] = self._row_list(s, r, "old_logprobs")
        student = self._optional_logprobs(rows, T, "student_logprobs", "teacher_mixed")
        sampler = self._optional_logprobs(rows, T, "sampler_logprobs", "sampler_logprobs")
        self._refuse_bad_values(rows, {"old_logprobs": old, "student_logprobs": student,
                                       "sampler_logprobs": sampler}, teacher=False)
        index = np.array([self._row_starts[self._shard_pos[s]] + r for s, r in rows], np.int64)
        group_ids = np.array([g.group_id for g in slices for _ in range(g.size)], np.int64)
        finished = np.array([self._shard(s).table.column("finish_reason")[r].as_py() == "stop" for s, r in rows])
        teacher = self._teacher_fields(rows, C, T)
        as_t = torch.from_numpy
        return CacheBatch(
            index=as_t(index), group_ids=as_t(group_ids), input_ids=as_t(input_ids),
            attention_mask=as_t(np.arange(L)[None, :] < (P + C)[:, None]), prompt_lengths=as_t(P),
            completion_ids=as_t(completion_ids), completion_mask=as_t(np.arange(T)[None, :] < C[:, None]),
            old_logprobs=as_t(old), student_logprobs=None if student is None else as_t(student),
            finished=as_t(finished.astype(bool)), **teacher,
            sampler_logprobs=None if sampler is None else as_t(sampler),
        )

    def _shard(self, shard: int):
        return self.store.shards[self._shard_pos[shard]]

    def _refuse_bad_values(self, rows, arrays: dict[str, np.ndarray | None], *, teacher: bool) -> None:
        """A one-line `CacheError` naming the file, the field, the row and the rebuild command when a batch holds
        a number no writer would have written (NaN, inf, a log-prob above 0): the file changed after its
        checksum was recorded, or was written before the writers checked their values."""
        for name, values in arrays.items():
            found = None if values is None else first_bad(values, logprobs=name.endswith("logprob") or
                                                          name.endswith("logprobs"))
            if found is not None:
                shard, row = rows[found[0]]
                path = self.teacher[shard].path if teacher else self._shard(shard).path
                raise CacheError(f"{path}: {describe_bad(name, found[1], f'rollout row {row}')}; rebuild it: "
                                 f"{rebuild_command(path.parent, shard)}")

    def _row_list(self, shard: int, row: int, name: str) -> np.ndarray:
        offsets, values = self._shard(shard).list_column(name)
        return values[offsets[row]:offsets[row + 1]]

    def _optional_logprobs(self, rows, T: int, column: str, flag: str) -> np.ndarray | None:
        """(B, T) of a nullable log-prob column, when a shard of these rows has it (manifest `flag`), else None."""
        if not any(self._shard(s).manifest.get(flag) for s, _ in rows):
            return None
        out = np.zeros((len(rows), T), np.float32)
        for b, (s, r) in enumerate(rows):
            values = self._row_list(s, r, column)
            out[b, :len(values)] = values
        return out

    def _teacher_fields(self, rows, C: np.ndarray, T: int) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {name: None for name, _ in _TOKEN_FIELDS.values()}
        out.update(teacher_seq_logprob=None, teacher_seq_tokens=None, teacher_seq_bytes=None)
        if not self.teacher:
            return out
        fields = self.spec.token_fields()
        names = [name for name in fields if name in _TOKEN_FIELDS]  # not the alignment records (xtok_*)
        padded = {}
        for name in names:
            width = fields[name][1]
            padded[name] = np.zeros((len(rows), T, width) if width else (len(rows), T), _TOKEN_FIELDS[name][1])
        seq = np.zeros(len(rows), np.float64)
        seq_tokens = C.copy()
        seq_bytes = np.zeros(len(rows), np.int64)
        for shard in sorted({s for s, _ in rows}):
            batch_pos = [b for b, (s, _) in enumerate(rows) if s == shard]
            local = np.array([rows[b][1] for b in batch_pos], np.int64)
            reader = self.teacher[shard].reader
            views = reader.read(local, names)
            for name in names:
                for b, view in zip(batch_pos, views[name]):
                    if name == "topk_logprobs":
                        view = stored_logprobs_as_float32(view)
                    padded[name][b, :len(view)] = view
            seq[batch_pos] = self._row_values(shard, "seq_logprob")[local]
            if self.spec.cross_tokenizer:
                seq_tokens[batch_pos] = self._row_values(shard, "xtok_num_tokens")[local]
                seq_bytes[batch_pos] = self._row_values(shard, "xtok_num_bytes")[local]
        self._refuse_bad_values(rows, {**padded, "seq_logprob": seq}, teacher=True)
        for name in names:
            out[_TOKEN_FIELDS[name][0]] = torch.from_numpy(padded[name])
        out["teacher_seq_logprob"] = torch.from_numpy(seq)
        out["teacher_seq_tokens"] = torch.from_numpy(seq_tokens)
        out["teacher_seq_bytes"] = torch.from_numpy(seq_bytes) if self.spec.cross_tokenizer else None
        return out

    def _row_values(self, shard: int, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_row_cache", {})
        if (shard, name) not in cache:
            cache[(shard, name)] = self.teacher[shard].reader.row_values(name)
        return cache[(shard, name)]


def prefetched(makers: Iterator, depth: int) -> Iterator:
    """Run each `maker()` in a background thread, up to `depth` results ahead; re-raise its errors here."""
    if depth <= 0:
        for maker in makers:
            yield maker()
        return
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for maker in makers:
                if stop.is_set() or not put(("ok", maker())):
                    return
            put(("ok", done))
        except BaseException as exc:  # handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=work, name="cache-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = results.get()
            if kind == "error":
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
