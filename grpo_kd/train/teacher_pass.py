"""The cache-teacher phase: score every rollout token with the teacher and write the teacher cache.

    run_teacher_pass(cfg, iteration=1, task=0, num_tasks=1)    # what `grpo-kd cache-teacher` calls

Shard mapping: teacher shard i scores rollout shard i, row for row (by rollout row number). Array task j of n
handles the rollout shards i with i % n == j, so n may be smaller than the number of rollout shards.

Per shard, a `Scorer` (teacher_scoring.py) batches the rows by length and writes, per completion token, the
teacher's top-k ids and log-probs and the exact sampled-token log-prob (see that module).

Teachers: kind "model" (its own weights; with another vocabulary it reads its own tokens of the prompt in its own
format, the completion text and its end of turn, tokenized together, and its log-probs are summed onto the
student's tokens byte by byte: grpo_kd/xtok.py, docs/cache.md "A teacher with another tokenizer"), "self_base" (the student's initial model, or
with `teacher.adapter` the current student: the checkpoint that sampled the rollouts, weights or adapters) and
"self_privileged" (either of the two, with the prompt rebuilt by
`render_prompt(..., privileged_template=teacher.prompt_template)`; the completion tokens are unchanged).
Prompts: each model is conditioned on the prompt in its own format. A teacher with a chat template
(`teacher.chat_template`, by default `data.chat_template`) renders the prompt text through its own tokenizer's
template, even with the student's vocabulary, and scores the student's completion tokens after it.
The reference log-probs (`teacher.reference`) come from the student's initial model with adapters off, in a
first pass whose [C] float32 results are kept in memory, so that two models are never loaded at once.

Idempotence: a shard whose manifest exists, whose checksum matches and which scored the current rollout file
with the current settings is skipped. An unfinished shard (a killed or requeued run) is written again into a
temporary name (`TeacherShardSink`), but the batches a killed run had scored, of the reference pass and of the
teacher, are kept (`grpo_kd.cache.progress`) and replayed instead of scored again: a kill costs at most the batch
in progress, never correctness.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import weakref
from dataclasses import dataclass
from typing import Any


from grpo_kd.cache.manifest import CacheError, describe_vocab, read_json, shard_is_complete, shard_manifest_path
from grpo_kd.cache.progress import ShardProgress, load_reference_batches, progress_dir, save_reference_batch
from grpo_kd.cache.rollouts import RolloutShard, RolloutStore
from grpo_kd.cache.spec import ALIGNMENT_RULES, CacheSpec
from grpo_kd.cache.teacher import TeacherShardSink
from grpo_kd.config import Config
from grpo_kd.data import teacher_chat_template
from grpo_kd.device import release_memory
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import (
    adapters_disabled,
    load_student,
    load_teacher,
    load_tokenizer,
    model_fingerprint,
    same_vocabulary,
    tokenizer_fingerprint,
)
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import student_checkpoint
from grpo_kd.train.preflight import check_vocabularies
from grpo_kd.train.teacher_scoring import Scorer
from grpo_kd.xtok import Aligner

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    task: int
    num_tasks: int
    shards_done: list[int]  # scored by this call
    shards_skipped: list[int]  # already finished
    tokens: int  # completion tokens scored by this call (not those of batches kept from a killed run)
    reference_tokens: int = 0  # completion tokens the reference pass scored in this call (not kept ones)

    def line(self) -> str:
        done = ", ".join(map(str, self.shards_done)) or "none"
        skipped = ", ".join(map(str, self.shards_skipped)) or "none"
        return (f"cache-teacher task {self.task}/{self.num_tasks}: scored shard(s) {done} ({self.tokens} tokens); "
                f"already complete: {skipped}")


# ----------------------------------------------------------------------------------------------- the pass


def run_teacher_pass(cfg: Config, *, iteration: int, task: int = 0, num_tasks: int = 1,
                     progress: bool = True) -> PassResult:
    """Score the rollout shards of task `task` of `num_tasks`; see the module doc."""
    paths = RunPaths.of(cfg.run_dir)
    rollouts_dir, teacher_dir = paths.rollouts(iteration), paths.teacher(iteration)
    store = _open_rollouts(rollouts_dir)
    mine = [s for s in store.shards if s.shard % num_tasks == task]
    if not mine:
        log.info("task %d of %d has no rollout shard to score (shards %s)", task, num_tasks, store.shard_ids)
        return PassResult(task, num_tasks, [], [], 0)
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
        return PassResult(task, num_tasks, [], skipped, 0)
    aligner = Aligner(student_tok, teacher_tok, chat_template=teacher_chat_template(cfg)) if spec.alignment else None
    ref = _reference_pass(cfg, pending, progress, teacher_dir, params) if spec.reference else {}
    with _teacher_scorer(cfg, paths, iteration, teacher_tok, spec, pending, aligner) as (scorer, model_fp):
        common = {"iteration": iteration, "task": {"index": task, "count": num_tasks}, "params": params,
                  "teacher": {**_teacher_desc(cfg), "model": model_fp, "tokenizer": teacher_fp},
                  "student": {"tokenizer": student_fp}, "token_level": spec.token_level,
                  "alignment": None if aligner is None else aligner.describe()}
        tokens = _score_pending(scorer, pending, common, ref, spec, teacher_dir, progress)
    return PassResult(task, num_tasks, [s.shard for s in pending], skipped, tokens, ref.get("_tokens", 0))


@contextlib.contextmanager
def _teacher_scorer(cfg: Config, paths: RunPaths, iteration: int, tokenizer, spec: CacheSpec, pending,
                    aligner: Aligner | None):
    """(scorer, the teacher's model fingerprint) for the pass: transformers or vLLM (`teacher.engine`)."""
    if cfg.teacher.engine == "vllm":
        from grpo_kd.engines.vllm_teacher import teacher_scorer

        with teacher_scorer(cfg, paths, iteration, tokenizer, spec, pending, aligner) as scorer_fp:
            yield scorer_fp
        return
    teacher = _load_teacher(cfg, paths, iteration)
    yield Scorer(cfg, teacher, tokenizer, spec, aligner=aligner), _model_fp(teacher)


def _score_pending(scorer, pending: list[RolloutShard], common: dict, ref: dict, spec: CacheSpec, teacher_dir,
                   progress: bool) -> int:
    """Score and write every pending shard, resuming from kept batches; returns the tokens scored now."""
    params = common["params"]
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
    return tokens


def _open_rollouts(directory) -> RolloutStore:
    try:
        return RolloutStore.open(directory)
    except CacheError as exc:
        raise GrpoKdError(f"cannot score rollouts: {exc}") from None


def _cache_spec(cfg: Config, student_fp: dict, teacher_fp: dict) -> CacheSpec:
    """The cache this teacher makes: top-k over the shared vocabulary, or, for a teacher with another one, its
    log-probs aligned onto the student's tokens (no top-k, no samples: they would be over its own ids)."""
    t = cfg.teacher
    check_vocabularies(cfg, student_fp, teacher_fp)  # what another vocabulary cannot serve
    cross = not same_vocabulary(student_fp, teacher_fp)
    if cross:
        log.info("teacher vocabulary %s differs from the student's %s: its log-probs are aligned onto the student's "
                 "tokens by their bytes (rule %s); no top-k is cached", describe_vocab(teacher_fp),
                 describe_vocab(student_fp), ALIGNMENT_RULES[0])
    return CacheSpec(format=t.cache_format, top_k=t.top_k, num_samples=0 if cross else t.num_samples,
                     logprob_dtype=t.logprob_dtype, token_level=not cross, reference=t.reference,
                     cross_tokenizer=cross, alignment=ALIGNMENT_RULES[0] if cross else None)


def _params(cfg: Config, spec: CacheSpec) -> dict[str, Any]:
    """Everything that changes the cache's content; a finished shard with other params is redone."""
    t = cfg.teacher
    return {"spec": spec.__dict__, "fields": sorted(spec.token_fields()),  # a cache of an older layout is redone
            "kind": t.kind, "path": t.path if t.kind == "model" else cfg.model.path,
            "adapter": t.adapter, "prompt_template": t.prompt_template if t.kind == "self_privileged" else None,
            "chat_template": teacher_chat_template(cfg),
            "temperature": t.temperature, "softcap": t.softcap, "token_budget": t.token_budget, "seed": cfg.seed,
            "engine": t.engine}


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
    return model_fingerprint(model)


def _load_teacher(cfg: Config, paths: RunPaths, iteration: int):
    """The teacher; a self-teacher with `teacher.adapter` is the student that sampled this iteration's rollouts
    (the checkpoint of iteration - 1; the initial model at iteration 1), not its base."""
    current = cfg.teacher.kind != "model" and cfg.teacher.adapter
    checkpoint = student_checkpoint(paths, iteration) if current else None
    if checkpoint is not None:
        log.info("self-teacher: the current student, %s", checkpoint)
    return load_teacher(cfg.teacher, cfg.model, checkpoint=None if checkpoint is None else str(checkpoint))


# ----------------------------------------------------------------------------------------------- reference


def _reference_pass(cfg: Config, shards: list[RolloutShard], progress: bool, teacher_dir, params: dict) -> dict:
    """{shard: [R] list of (C,) float32 arrays} of the reference model's log-probs of each rollout's tokens,
    plus "_desc" (the model) and "_tokens" (tokens scored now). Kept log-probs of an interrupted run are reused."""
    out: dict[Any, Any] = {"_tokens": 0}
    with _reference_scorer(cfg, shards) as (scorer, model_fp):
        desc = {"path": cfg.model.path, "adapters": "off", "model": model_fp}
        out["_desc"] = desc
        for shard in shards:
            key = {"params": params, "rollouts": shard.manifest["sha256"], "reference": desc}
            kept = load_reference_batches(teacher_dir, shard.shard, key, shard.lengths())
            if kept:
                log.info("reference log-probs of shard %d: %d batches kept from an interrupted run", shard.shard,
                         len(kept))
            keep = functools.partial(save_reference_batch, teacher_dir, shard.shard, key)  # (index, rows, logprobs)
            out[shard.shard], scored = scorer.reference_logprobs(shard, progress=progress, kept=kept, keep=keep)
            out["_tokens"] += scored
        del scorer  # the model goes when the block ends
    return out


@contextlib.contextmanager
def _reference_scorer(cfg: Config, shards: list[RolloutShard]):
    """(scorer, model fingerprint) of the reference: the student's initial model with adapters off, through
    transformers or vLLM (`teacher.engine`); its memory is returned when the block ends."""
    spec = CacheSpec(format=cfg.teacher.cache_format, token_level=False)
    if cfg.teacher.engine == "vllm":
        from grpo_kd.engines.vllm_teacher import reference_scorer

        with reference_scorer(cfg, spec, shards) as scorer_fp:
            yield scorer_fp
        return
    model = load_student(cfg.model, checkpoint=None, trainable=False)
    with adapters_disabled(model):
        yield Scorer(cfg, model, None, spec, reference=True), _model_fp(model)
    dropped = weakref.ref(model)
    del model
    release_memory(dropped)
