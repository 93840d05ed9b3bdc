"""The cache-teacher phase: score every rollout token with the teacher and write the teacher cache.

    run_teacher_pass(cfg, iteration=1, task=0, num_tasks=1)    # what `grpo-kd cache-teacher` calls

Shard mapping: teacher shard i scores rollout shard i, row for row (by rollout row number). Array task j of n
handles the rollout shards i with i % n == j, so n may be smaller than the number of rollout shards.

Per shard: rows sorted by length (stable), cut into batches of at most `teacher.token_budget` padded tokens;
for each batch `final_hidden_states` (the LM head never runs) and then, on the completion positions only,
`linear_topk` (top-k ids and log-probs and the exact sampled-token log-prob), optionally m samples from the
teacher with their log-probs (`teacher_samples.py`). Alignment: completion token t sits at position P + t of
`prompt + completion` and is predicted by the hidden state at P + t - 1 (`grpo_kd.cache.reader.completion_hidden`).

Teachers: kind "model" (its own weights; with another vocabulary and `teacher.cross_tokenizer` it re-tokenises
the prompt and completion texts and scores whole sequences only), "self_base" (the student's initial model, or
with `teacher.adapter` the current student: the checkpoint that sampled the rollouts, weights or adapters) and
"self_privileged" (either of the two, with the prompt rebuilt by
`render_prompt(..., privileged_template=teacher.prompt_template)`; the completion tokens are unchanged).
The reference log-probs (`teacher.reference`) come from the student's initial model with adapters off, in a
first pass whose [C] float32 results are kept in memory, so that two models are never loaded at once.

Idempotence: a shard whose manifest exists, whose checksum matches and which scored the current rollout file
with the current settings is skipped. An unfinished shard (a killed or requeued run) is written again into a
temporary name (`TeacherShardSink`), but the batches a killed run had scored, of the reference pass and of the
teacher, are kept (`grpo_kd.cache.progress`) and replayed instead of scored again: a kill costs at most the batch
in progress, never correctness.
"""

from __future__ import annotations

import functools
import logging
import shutil
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from grpo_kd.cache.manifest import CacheError, describe_vocab, read_json, shard_is_complete, shard_manifest_path
from grpo_kd.cache.progress import ShardProgress, load_reference_batches, progress_dir, save_reference_batch
from grpo_kd.cache.reader import completion_hidden
from grpo_kd.cache.rollouts import RolloutShard, RolloutStore
from grpo_kd.cache.teacher import CacheSpec, ScoredRows, TeacherShardSink, bf16_bits
from grpo_kd.config import Config
from grpo_kd.device import release_memory
from grpo_kd.errors import GrpoKdError
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import student_checkpoint
from grpo_kd.train.teacher_samples import sample_teacher

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    shards_done: list[int]  # scored by this call
    shards_skipped: list[int]  # already finished
    tokens: int  # completion tokens scored by this call (not those of batches kept from a killed run)
    reference_tokens: int = 0  # completion tokens the reference pass scored in this call (not kept ones)


# ----------------------------------------------------------------------------------------------- the pass


def run_teacher_pass(cfg: Config, *, iteration: int, task: int = 0, num_tasks: int = 1,
                     progress: bool = True) -> PassResult:
    """Score the rollout shards of task `task` of `num_tasks`; see the module doc."""
    from grpo_kd.models import load_tokenizer, tokenizer_fingerprint

    paths = RunPaths.of(cfg.run_dir)
    rollouts_dir, teacher_dir = paths.rollouts(iteration), paths.teacher(iteration)
    store = _open_rollouts(rollouts_dir)
    mine = [s for s in store.shards if s.shard % num_tasks == task]
    if not mine:
        log.info("task %d of %d has no rollout shard to score (shards %s)", task, num_tasks, store.shard_ids)
        return PassResult([], [], 0)
    student_tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    teacher_tok = student_tok if cfg.teacher.kind != "model" else load_tokenizer(
        cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
    student_fp, teacher_fp = tokenizer_fingerprint(student_tok), tokenizer_fingerprint(teacher_tok)
    spec = _cache_spec(cfg, student_fp, teacher_fp)
    params = _params(cfg, spec)
    pending = [s for s in mine if not _finished(teacher_dir, s, spec, params)]
    skipped = [s.shard for s in mine if s not in pending]
    for j in skipped:
        log.info("teacher shard %d is already complete; nothing to do", j)
        shutil.rmtree(progress_dir(teacher_dir, j), ignore_errors=True)  # killed between finishing and clearing
    if not pending:
        return PassResult([], skipped, 0)
    ref = _reference_pass(cfg, pending, progress, teacher_dir, params) if spec.reference else {}
    teacher = _load_teacher(cfg, paths, iteration)
    scorer = Scorer(cfg, teacher, teacher_tok, spec)
    common = {"iteration": iteration, "task": {"index": task, "count": num_tasks}, "params": params,
              "teacher": {**_teacher_desc(cfg), "model": _model_fp(teacher), "tokenizer": teacher_fp},
              "student": {"tokenizer": student_fp}, "token_level": spec.token_level}
    tokens = 0
    for shard in pending:
        scored_rollouts = {"file": shard.path.name, "sha256": shard.manifest["sha256"], "rows": shard.num_rows,
                           "tokens": shard.manifest["tokens"]}
        manifest = {**common, "rollouts": scored_rollouts, "reference": ref.get("_desc")}
        kept = ShardProgress(teacher_dir, shard.shard, spec, key={
            "params": params, "rollouts": scored_rollouts, "teacher": common["teacher"], "reference": ref.get("_desc")})
        done = kept.load()
        if done:
            log.info("teacher shard %d: resuming with %d scored batches (%d tokens) kept from an interrupted run",
                     shard.shard, len(done), sum(int(d.num_tokens.sum()) for d in done.values()))
        kept.start()
        with TeacherShardSink(teacher_dir, shard.shard, spec, total_rows=shard.num_rows,
                              total_tokens=int(shard.lengths().sum()), manifest=manifest) as sink:
            for index, scored, fresh in scorer.score_shard(shard, ref.get(shard.shard), progress=progress, done=done):
                if fresh:
                    kept.save(index, scored)
                    tokens += int(scored.num_tokens.sum())
                sink.add(scored)
        kept.clear()
        log.info("teacher shard %d written: %d rows, %d tokens", shard.shard, shard.num_rows, sink.tokens_written)
    return PassResult([s.shard for s in pending], skipped, tokens, ref.get("_tokens", 0))


def _open_rollouts(directory) -> RolloutStore:
    try:
        return RolloutStore.open(directory)
    except CacheError as exc:
        raise GrpoKdError(f"cannot score rollouts: {exc}") from None


def _cache_spec(cfg: Config, student_fp: dict, teacher_fp: dict) -> CacheSpec:
    from grpo_kd.models import same_vocabulary

    t = cfg.teacher
    cross = not same_vocabulary(student_fp, teacher_fp)
    if cross and not t.cross_tokenizer:
        raise GrpoKdError(f"teacher vocabulary {describe_vocab(teacher_fp)} differs from the student's "
                          f"{describe_vocab(student_fp)}: token-level caching needs a shared vocabulary; set "
                          "teacher.cross_tokenizer=true to cache sequence-level scores only")
    return CacheSpec(format=t.cache_format, top_k=t.top_k, num_samples=0 if cross else t.num_samples,
                     logprob_dtype=t.logprob_dtype, token_level=not cross, reference=t.reference,
                     cross_tokenizer=cross)


def _params(cfg: Config, spec: CacheSpec) -> dict[str, Any]:
    """Everything that changes the cache's content; a finished shard with other params is redone."""
    t = cfg.teacher
    return {"spec": spec.__dict__, "fields": sorted(spec.token_fields()),  # a cache of an older layout is redone
            "kind": t.kind, "path": t.path if t.kind == "model" else cfg.model.path,
            "adapter": t.adapter, "prompt_template": t.prompt_template if t.kind == "self_privileged" else None,
            "temperature": t.temperature, "softcap": t.softcap, "token_budget": t.token_budget, "seed": cfg.seed,
            "cross_tokenizer_norm": t.cross_tokenizer_norm if spec.cross_tokenizer else None}


def _finished(teacher_dir, shard: RolloutShard, spec: CacheSpec, params: dict) -> bool:
    if not shard_is_complete(teacher_dir, shard.shard, spec.suffix, verify_checksum=True):
        return False
    manifest = read_json(shard_manifest_path(teacher_dir, shard.shard))
    same_rollouts = manifest.get("rollouts", {}).get("sha256") == shard.manifest.get("sha256")
    return same_rollouts and manifest.get("params") == params


def _teacher_desc(cfg: Config) -> dict[str, Any]:
    t = cfg.teacher
    return {"kind": t.kind, "path": t.path if t.kind == "model" else cfg.model.path, "adapter": t.adapter,
            "temperature": t.temperature, "top_k": t.top_k, "num_samples": t.num_samples,
            "prompt_template": t.prompt_template if t.kind == "self_privileged" else None}


def _model_fp(model) -> dict[str, Any]:
    from grpo_kd.models import model_fingerprint

    return model_fingerprint(model)


def _load_teacher(cfg: Config, paths: RunPaths, iteration: int):
    """The teacher; a self-teacher with `teacher.adapter` is the student that sampled this iteration's rollouts
    (the checkpoint of iteration - 1; the initial model at iteration 1), not its base."""
    from grpo_kd.models import load_teacher

    current = cfg.teacher.kind != "model" and cfg.teacher.adapter
    checkpoint = student_checkpoint(paths, iteration) if current else None
    if checkpoint is not None:
        log.info("self-teacher: the current student, %s", checkpoint)
    return load_teacher(cfg.teacher, cfg.model, checkpoint=None if checkpoint is None else str(checkpoint))


# ----------------------------------------------------------------------------------------------- reference


def _reference_pass(cfg: Config, shards: list[RolloutShard], progress: bool, teacher_dir, params: dict) -> dict:
    """{shard: [R] list of (C,) float32 arrays} of the reference model's log-probs of each rollout's tokens,
    plus "_desc" (the model) and "_tokens" (tokens scored now). Kept log-probs of an interrupted run are reused."""
    from grpo_kd.models import adapters_disabled, load_student

    model = load_student(cfg.model, checkpoint=None, trainable=False)
    scorer = Scorer(cfg, model, None, CacheSpec(format=cfg.teacher.cache_format, token_level=False),
                    reference=True)
    desc = {"path": cfg.model.path, "adapters": "off", "model": _model_fp(model)}
    out: dict[Any, Any] = {"_desc": desc, "_tokens": 0}
    with adapters_disabled(model):
        for shard in shards:
            key = {"params": params, "rollouts": shard.manifest["sha256"], "reference": desc}
            kept = load_reference_batches(teacher_dir, shard.shard, key, shard.lengths())
            if kept:
                log.info("reference log-probs of shard %d: %d batches kept from an interrupted run", shard.shard,
                         len(kept))
            keep = functools.partial(save_reference_batch, teacher_dir, shard.shard, key)  # (index, rows, logprobs)
            out[shard.shard], scored = scorer.reference_logprobs(shard, progress=progress, kept=kept, keep=keep)
            out["_tokens"] += scored
    dropped = weakref.ref(model)
    del model, scorer
    release_memory(dropped)
    return out


# ----------------------------------------------------------------------------------------------- scoring


class Scorer:
    """One loaded model scoring rollout shards batch by batch (see the module doc)."""

    def __init__(self, cfg: Config, model, tokenizer, spec: CacheSpec, reference: bool = False):
        from grpo_kd.models import lm_head

        self.cfg, self.model, self.tokenizer, self.spec = cfg, model, tokenizer, spec
        self.head = lm_head(model)
        self.reference = reference
        self.temperature = 1.0 if reference else cfg.teacher.temperature
        cap = cfg.teacher.softcap if not reference else None
        self.softcap = cap if cap is not None else self.head.softcap
        self.device = model.get_input_embeddings().weight.device
        self.privileged = (not reference) and cfg.teacher.kind == "self_privileged"

    # -- inputs
    def _prompts(self, shard: RolloutShard) -> list[np.ndarray]:
        """Prompt ids the model is conditioned on, per row (rebuilt for the privileged or another tokenizer)."""
        offsets, values = shard.list_column("prompt_ids")
        if not (self.privileged or self.spec.cross_tokenizer):
            return [values[offsets[i]:offsets[i + 1]] for i in range(shard.num_rows)]
        from grpo_kd.data import Prompt, encode_prompt, render_prompt

        texts = shard.table.column("prompt_text").to_pylist()
        privileged = shard.table.column("privileged").to_pylist()
        ids = shard.table.column("prompt_id").to_pylist()
        template = self.cfg.teacher.prompt_template if self.privileged else None
        chat = self.cfg.data.chat_template
        return [np.asarray(encode_prompt(self.tokenizer, render_prompt(self.tokenizer, Prompt(pid, text, priv),
                                                                       chat_template=chat,
                                                                       privileged_template=template),
                                         chat_template=chat), np.int64)
                for pid, text, priv in zip(ids, texts, privileged)]

    def _completions(self, shard: RolloutShard) -> list[np.ndarray]:
        if self.spec.cross_tokenizer and not self.reference:
            return [np.asarray(self.tokenizer(t, add_special_tokens=False)["input_ids"], np.int64)
                    for t in shard.table.column("completion_text").to_pylist()]
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
        from grpo_kd.models import final_hidden_states

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

    def _progress(self, total: int, label: str, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                        TimeRemainingColumn(), disable=not enabled, transient=False)

    def _loop(self, shard: RolloutShard, label: str, progress: bool,
              kept: dict[int, np.ndarray] | None = None) -> Iterator[
            tuple[int, np.ndarray, torch.Tensor | None, torch.Tensor | None, np.ndarray]]:
        """(batch index, rows, hidden states (N, H), target ids (N,), C per row) per batch. A batch whose index
        and rows are in `kept` ({index: rows} of batches scored earlier) gets no forward pass: None, None."""
        prompts, completions = self._prompts(shard), self._completions(shard)
        batches = self._batches(prompts, completions)
        total = int(sum(len(c) for c in completions))
        with self._progress(total, label, progress) as bar:
            task = bar.add_task(label, total=total)
            for n, rows in enumerate(batches):
                if kept and n in kept and np.array_equal(kept[n], rows):
                    C = np.array([len(completions[i]) for i in rows], np.int64)
                    yield n, rows, None, None, C
                else:
                    if kept and n in kept:
                        log.warning("shard %d: kept batch %d holds other rows; scoring it again", shard.shard, n)
                    h, targets, C = self._hidden(prompts, completions, rows)
                    yield n, rows, h, targets, C
                bar.advance(task, int(C.sum()))

    def reference_logprobs(self, shard: RolloutShard, progress: bool,
                           kept: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                           keep=None) -> tuple[list[np.ndarray], int]:
        """([R] (C,) float32 log-probs per row, tokens scored now). A batch in `kept` ({index: (rows, (N,)
        log-probs)} from an interrupted run) with exactly that batch's rows is reused; `keep(index, rows,
        logprobs)` is called after each batch scored now."""
        from grpo_kd.kernels import linear_logprobs

        kept = kept or {}
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * shard.num_rows
        scored = 0
        label = f"reference  shard {shard.shard}"
        for n, rows, h, targets, C in self._loop(shard, label, progress, {n: r for n, (r, _) in kept.items()}):
            if h is None:
                values = kept[n][1]
            else:
                logprobs, _, _ = linear_logprobs(h, self.head.weight, targets, bias=self.head.bias)  # (N,)
                values = logprobs.float().cpu().numpy()
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
        from grpo_kd.kernels import linear_logprobs, linear_topk

        group_ids = shard.table.column("group_id").to_numpy()
        student_C = shard.lengths()
        done = done or {}
        kept = {n: scored.row for n, scored in done.items()}
        for n, rows, h, targets, C in self._loop(shard, f"teacher    shard {shard.shard}", progress, kept):
            if h is None:
                yield n, done[n], False
                continue
            token: dict[str, np.ndarray] = {}
            extra = None
            if self.spec.token_level:
                ids, logprobs, _, target = linear_topk(h, self.head.weight, self.spec.top_k, bias=self.head.bias,
                                                       temperature=self.temperature, softcap=self.softcap,
                                                       target_ids=targets)
                token["topk_ids"] = ids.to(torch.int32).cpu().numpy()
                token["topk_logprobs"] = (logprobs.to(torch.float16).cpu().numpy() if self.spec.logprob_dtype
                                          == "float16" else bf16_bits(logprobs))
                token["target_logprobs"] = target.float().cpu().numpy()
                if self.spec.num_samples:
                    seed = hash((self.cfg.seed, shard.shard, n)) % 2**31
                    token["sample_ids"], token["sample_weights"], token["sample_logprobs"] = sample_teacher(
                        h, self.head.weight, self.head.bias, self.spec.num_samples, temperature=self.temperature,
                        softcap=self.softcap, seed=seed)
                seq = _row_sums(token["target_logprobs"], C)
            else:
                target, _, _ = linear_logprobs(h, self.head.weight, targets, bias=self.head.bias,
                                               temperature=self.temperature, softcap=self.softcap)
                seq = _row_sums(target.float().cpu().numpy(), C)
                texts = shard.table.column("completion_text")
                extra = {"xtok_num_tokens": C.astype(np.int32),
                         "xtok_num_bytes": np.array([len(texts[int(i)].as_py().encode("utf-8")) for i in rows],
                                                    np.int64)}
            if self.spec.reference:
                token["ref_logprobs"] = np.concatenate([ref[i] for i in rows]) if len(rows) else np.zeros(0)
            yield n, ScoredRows(row=rows.astype(np.int64), group_id=group_ids[rows].astype(np.int64),
                                num_tokens=student_C[rows].astype(np.int32), seq_logprob=seq, token=token,
                                extra=extra), True


def _row_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-row sums (float64) of a flat per-token array."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sums = np.add.reduceat(values.astype(np.float64), starts) if len(values) else np.zeros(len(counts))
    return np.where(counts > 0, sums, 0.0)
