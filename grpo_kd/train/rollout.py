"""The rollout phase of iteration i: the current student samples G completions for each prompt of the iteration.

    run_rollout(cfg, iteration=2, shard=0, num_shards=4) -> runs/NAME/iter_0002/rollouts/part-00000.arrow

Which student (`checkpoint.student_checkpoint`): the initial model (`cfg.model.path`) at iteration 1, or the SFT
phase's checkpoints/iter_0000 when it ran, else the `model/` directory of the update checkpoint of iteration i-1
(full weights or a peft adapter).

Which prompts (deterministic in `cfg.seed`): the training prompts are `data.prompts` minus the held-out slice
(`split_heldout`, as the evaluator holds it out; nothing is held out when `data.heldout_prompts` is given).
They are laid end to end as an endless stream of epochs, each epoch a seeded permutation of all of them, and
iteration i takes stream positions `[(i-1) P, i P)` for `P = rollout.prompts_per_iteration`: every prompt is
used once per epoch before any is used again. `group_id` is the position within the iteration (0..P-1). Shard
j of n takes the contiguous block of groups `[j P // n, (j+1) P // n)`, so groups never split.

What is stored as `old_logprobs`: the behaviour log-probs recomputed after sampling with
`grpo_kd.train.policy.completion_logprobs` (one full forward, right padding, the same kernel and temperature
the update phase uses), so that the first importance ratio of the update is 1 up to float rounding. They are
log-probs of the *untruncated* temperature-scaled distribution: top-k / top-p truncation shapes what is drawn
but is not part of the recorded log-probs (TRL does the same: the update recomputes full-distribution
log-probs with the kernel, which knows nothing of truncation, so a truncated old log-prob would put the first
ratio off 1 by the kept mass). With teacher-mixed sampling, `old_logprobs = log(alpha p_T(y) + (1 - alpha)
q_S(y))` of the two recomputed terms and `student_logprobs = log q_S(y)`, both at the *rollout* temperature
(the teacher cache scores at `teacher.temperature`, which may differ; importance weights q_S / mixture need
these). The manifest records the largest difference between the stored values and those of the KV-cache
sampling loop (`logprob_drift`: mean and max |delta| per token; `logprob_drift_max`): float rounding in
float32, bf16 noise on a GPU. `rollout.recompute_logprobs` decides (default: recompute only where the two differ by
more than float rounding, a 16-bit student or teacher-mixed sampling); otherwise the loop's own values are stored
(no second forward; the drift is 0).

Engines (`rollout.engine`): "hf" samples with the KV-cache loop of `grpo_kd.train.sampling`; "vllm" samples with
vLLM (`grpo_kd.engines.vllm_rollout`) and then always recomputes `old_logprobs` the same way, storing vLLM's own
log-probs as `sampler_logprobs`; its `logprob_drift` is the vLLM-vs-trainer mismatch that `loss.policy.tis_cap`
corrects.

Randomness is per completion (see `grpo_kd.train.sampling`): a completion depends on the seed, the iteration,
its group id and sample index, not on the batch size or the shard layout, so 1 shard and n shards write the
same rows. `prompt_ids` are exactly what the student saw (chat-rendered when `data.chat_template`, the last
`data.max_prompt_tokens`); `prompt_text` is the raw prompt, so a teacher with another template or tokenizer can
render it its own way.

Idempotent: a shard whose manifest and checksum are complete is skipped (after checking that it was made with
the same plan: seed, prompts, sampling parameters, shard layout); the store writes atomically, so a killed
run leaves nothing that looks finished and a re-run redoes the shard. The merged `manifest.json` is written by
whichever shard finishes last (it sees all n shard manifests); concurrent writers would write the same
content, each through its own temporary file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from grpo_kd.cache.manifest import (
    list_shard_manifests,
    read_json,
    shard_is_complete,
    shard_manifest_path,
    write_index,
)
from grpo_kd.cache.rollouts import ROLLOUT_KIND, ROLLOUT_SUFFIX, RolloutRecord, write_rollout_shard
from grpo_kd.config import Config
from grpo_kd.data import (
    Prompt,
    prompt_token_ids,
    prompts_from_config,
    split_heldout,
    teacher_chat_template,
    teacher_has_own_prompt,
)
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import (
    eos_token_ids,
    lm_head,
    load_student,
    load_teacher,
    load_tokenizer,
    model_fingerprint,
    tokenizer_fingerprint,
)
from grpo_kd.paths import RunPaths, part_name
from grpo_kd.shards import shard_range
from grpo_kd.train.checkpoint import student_checkpoint
from grpo_kd.train.policy import collate, completion_logprobs
from grpo_kd.train.preflight import check_vocabularies
from grpo_kd.train.sampling import Sample, SamplingParams, sample_batch
from grpo_kd.xtok import completion_text

log = logging.getLogger(__name__)

RNG_SCHEME = "per-row torch.Generator seeded by sha256(seed, iteration, group_id, sample_index); inverse CDF"
VLLM_RNG_SCHEME = "vLLM, one request per completion with seed sha256(seed, iteration, group_id, sample_index)"
# Keys of a shard manifest's meta that must match for a finished shard to be reused.
PLAN_KEYS = ("iteration", "seed", "num_shards", "group_range", "prompts", "sampling")


@dataclass(frozen=True)
class RolloutSummary:
    """What one `grpo-kd rollout` did, for its one-line summary."""

    path: Path
    shard: int
    num_shards: int
    completions: int
    tokens: int  # completion tokens
    seconds: float  # sampling and the log-prob recompute (model loading excluded)
    skipped: bool  # the shard was already complete
    drift: dict[str, float] | None = None  # mean_abs / max_abs of |sampler log-prob - old_logprobs| per token

    def line(self) -> str:
        if self.skipped:
            return (f"rollout shard {self.shard}/{self.num_shards}: already complete ({self.completions} completions, "
                    f"{self.tokens} tokens): {self.path}")
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        drift = (f", |sampler - trainer log-prob| mean {self.drift['mean_abs']:.2e} max {self.drift['max_abs']:.2e}"
                 if self.drift else "")
        return (f"rollout shard {self.shard}/{self.num_shards}: {self.completions} completions, {self.tokens} tokens, "
                f"{rate:.1f} tokens/s{drift} -> {self.path}")


# ---------------------------------------------------------------------------------------------- what to sample


def training_prompts(cfg: Config) -> list[Prompt]:
    """`data.prompts` without the held-out slice (the whole of it when `data.heldout_prompts` is set)."""
    prompts = prompts_from_config(cfg.data)
    if cfg.data.heldout_prompts:
        return prompts
    train, _ = split_heldout(prompts, cfg.data.heldout_fraction, cfg.seed)
    if not train:
        raise GrpoKdError(f"{cfg.data.prompts}: no training prompts are left after holding out "
                          f"data.heldout_fraction={cfg.data.heldout_fraction}")
    return train


def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"grpo-kd:prompts:{seed}:{epoch}").shuffle(order)  # str seeds hash with sha512: stable
    return order


def iteration_prompts(prompts: Sequence[Prompt], per_iteration: int, iteration: int, seed: int) -> list[Prompt]:
    """The `per_iteration` prompts of `iteration` (1-based): stream positions [(i-1) P, i P) of seeded epochs."""
    if iteration < 1:
        raise GrpoKdError(f"iteration must be at least 1, got {iteration}")
    orders: dict[int, list[int]] = {}
    chosen = []
    for position in range((iteration - 1) * per_iteration, iteration * per_iteration):
        epoch, index = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = _epoch_order(len(prompts), seed, epoch)
        chosen.append(prompts[orders[epoch][index]])
    return chosen


def sample_seed(seed: int, iteration: int, group_id: int, sample_index: int) -> int:
    """The seed of one completion's generator: a 63-bit hash of where it sits in the run."""
    digest = hashlib.sha256(f"grpo-kd:sample:{seed}:{iteration}:{group_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_ids(tokenizer, prompt: Prompt, cfg: Config) -> list[int]:
    """The prompt's token ids as the student sees them, keeping the last `data.max_prompt_tokens`."""
    ids = prompt_token_ids(tokenizer, prompt, chat_template=cfg.data.chat_template,
                           max_tokens=cfg.data.max_prompt_tokens)
    if not ids:
        raise GrpoKdError(f"prompt {prompt.id!r} is empty after tokenization")
    return list(ids)


def teacher_prompt_ids(teacher_tokenizer, prompt: Prompt, cfg: Config) -> list[int]:
    """The prompt's ids as a mixing teacher with a format of its own sees them (`teacher_has_own_prompt`)."""
    ids = prompt_token_ids(teacher_tokenizer, prompt, chat_template=teacher_chat_template(cfg))
    if not ids:
        raise GrpoKdError(f"prompt {prompt.id!r} is empty after the teacher's tokenization")
    return ids


def sampling_params(cfg: Config) -> SamplingParams:
    r = cfg.rollout  # the ranges of these settings are checked with the config (grpo_kd.config.rules)
    return SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.teacher_mix_alpha)


def plan_meta(cfg: Config, iteration: int, shard: int, num_shards: int) -> dict[str, Any]:
    """What a shard is made from, apart from the models: compared before a finished shard is reused."""
    r = cfg.rollout
    start, stop = shard_range(r.prompts_per_iteration, shard, num_shards)
    return {
        "iteration": iteration,
        "seed": cfg.seed,
        "num_shards": num_shards,
        "group_range": [start, stop],
        "prompts": {
            "source": cfg.data.prompts,
            "heldout_fraction": None if cfg.data.heldout_prompts else cfg.data.heldout_fraction,
            "max_prompts": cfg.data.max_prompts,
            "prompts_per_iteration": r.prompts_per_iteration,
            "chat_template": cfg.data.chat_template,
            "max_prompt_tokens": cfg.data.max_prompt_tokens,
            **({"teacher_chat_template": teacher_chat_template(cfg)}  # the mixing teacher reads its own format
               if r.teacher_mix_alpha > 0 and teacher_has_own_prompt(cfg) else {}),
        },
        "sampling": {
            **sampling_params(cfg).as_dict(),
            "engine": r.engine,
            "group_size": r.group_size,
            "rng": RNG_SCHEME if r.engine == "hf" else VLLM_RNG_SCHEME,
            "logprobs": {"recompute": True if r.engine == "vllm" else r.recompute_logprobs,
                         "values": "at the sampling temperature, untruncated (top-k/top-p not applied)"},
        },
    }


# ---------------------------------------------------------------------------------------------- models


def _check_teacher_vocabulary(cfg: Config, student_tok, student_fp: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The teacher's tokenizer and its fingerprint; a one-line error naming both when it is not the student's."""
    if cfg.teacher.kind != "model":
        return student_tok, student_fp  # the self-teachers are the student's own base
    teacher_tok = load_tokenizer(cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
    teacher_fp = tokenizer_fingerprint(teacher_tok)
    check_vocabularies(cfg, student_fp, teacher_fp)
    return teacher_tok, teacher_fp


# ---------------------------------------------------------------------------------------------- recording


RECOMPUTE_TOKENS = 8192  # padded tokens per forward of the log-prob recompute (its rows batched by length)


def recorded_logprobs(
    student, teacher, prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sample], params: SamplingParams,
    pad_id: int, teacher_prompt_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(old_logprobs (R, T), student_logprobs (R, T) | None, completion_mask (R, T)) recomputed on CPU tensors.

    Without a teacher old = student and the second is None; with one, old = log(alpha p_T + (1 - alpha) q_S),
    the teacher conditioned on `teacher_prompt_ids` (its own format) when given, else on the student's prompt.
    The rows are scored in length-sorted chunks of at most `RECOMPUTE_TOKENS` padded tokens, so the padding of
    short completions beside long ones costs no forward (a row's values do not depend on its chunk).
    """
    completions = [s.completion_ids for s in samples]
    width = max(1, max((len(c) for c in completions), default=0))
    mask = torch.zeros((len(completions), width), dtype=torch.float32)  # (R, T) 1 on real completion tokens
    for r, completion in enumerate(completions):
        mask[r, : len(completion)] = 1.0
    with torch.no_grad():
        student_lp = _chunked_logprobs(student, prompt_ids, completions, width, params.temperature, pad_id)
        alpha = params.teacher_mix_alpha
        if alpha == 0:
            return student_lp, None, mask
        teacher_lp = _chunked_logprobs(teacher, teacher_prompt_ids or prompt_ids, completions, width,
                                       params.temperature, pad_id)
    return mixture_logprobs(teacher_lp, student_lp, alpha) * mask, student_lp, mask


def _chunked_logprobs(model, prompts, completions, width: int, temperature: float, pad_id: int) -> torch.Tensor:
    """`completion_logprobs` of every row, (R, width) float32 on the CPU, over length-sorted chunks."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    out = torch.zeros((len(completions), width), dtype=torch.float32)  # (R, T)
    for rows in _length_chunks(lengths, RECOMPUTE_TOKENS):
        batch = collate([prompts[r] for r in rows], [completions[r] for r in rows], pad_id=pad_id)
        logprobs, _ = completion_logprobs(model, batch.to(device), temperature=temperature)  # (b, t)
        out[rows, : logprobs.shape[1]] = logprobs.float().cpu()
    return out


def _length_chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices, longest first, cut into chunks of at most `budget` padded tokens (one row at least)."""
    chunks: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not chunks or (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] > budget:
            chunks.append([])
        chunks[-1].append(r)
    return chunks


def collate_logprobs(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-row log-prob lists as one float32 (R, max length) tensor, zero-padded."""
    out = torch.zeros((len(rows), max(map(len, rows), default=0)), dtype=torch.float32)  # (R, T)
    for r, values in enumerate(rows):
        out[r, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def mixture_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha exp(teacher) + (1 - alpha) exp(student)), elementwise and stable; exact at alpha 0 and 1."""
    if alpha == 0:
        return student_logprobs.clone()
    if alpha == 1:
        return teacher_logprobs.clone()
    return torch.logaddexp(teacher_logprobs + math.log(alpha), student_logprobs + math.log1p(-alpha))


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------- the phase


def run_rollout(cfg: Config, iteration: int, shard: int = 0, num_shards: int = 1) -> Path:
    """Write rollout shard `shard` of `num_shards` for `iteration` (skipped when complete); return its path."""
    return rollout_shard(cfg, iteration, shard, num_shards).path


def rollout_shard(
    cfg: Config, iteration: int, shard: int = 0, num_shards: int = 1, *, show_progress: bool = False
) -> RolloutSummary:
    """`run_rollout` with the counts and timing the command line prints."""
    paths = RunPaths.of(cfg.run_dir)
    directory = paths.rollouts(iteration)
    plan = plan_meta(cfg, iteration, shard, num_shards)
    _refuse_other_layout(directory, num_shards)
    if shard_is_complete(directory, shard, ROLLOUT_SUFFIX):
        return _reuse(directory, shard, num_shards, plan)
    records, meta = _sample_shard(cfg, paths, iteration, plan, show_progress)
    seconds = meta["generation_seconds"]
    path = write_rollout_shard(directory, shard, records, meta=meta, index=False)
    _write_index_if_all_done(directory, num_shards)
    tokens = sum(len(r.completion_ids) for r in records)
    log.info("rollout shard %d/%d: %d completions, %d tokens in %.1fs", shard, num_shards, len(records), tokens,
             seconds)
    return RolloutSummary(path, shard, num_shards, len(records), tokens, seconds, skipped=False,
                          drift=meta["logprob_drift"])


def _refuse_other_layout(directory: Path, num_shards: int) -> None:
    extra = sorted(j for j in list_shard_manifests(directory) if j >= num_shards)
    if extra:
        raise GrpoKdError(f"{directory} holds rollout shard {extra[0]}, from a run with more than {num_shards} "
                          f"shard(s); remove the directory to sample this iteration again with {num_shards}")


def _reuse(directory: Path, shard: int, num_shards: int, plan: dict[str, Any]) -> RolloutSummary:
    """The summary of a complete shard, after checking that it was made with this plan."""
    manifest = read_json(shard_manifest_path(directory, shard))
    meta = manifest.get("meta", {})
    for key in PLAN_KEYS:
        if meta.get(key) != plan[key]:
            raise GrpoKdError(f"rollout shard {shard} in {directory} is complete but was made with another {key} "
                              f"({meta.get(key)!r}, now {plan[key]!r}); remove it to sample it again")
    log.info("rollout shard %d/%d in %s is already complete; skipping", shard, num_shards, directory)
    _write_index_if_all_done(directory, num_shards)
    path = directory / part_name(shard, ROLLOUT_SUFFIX)
    return RolloutSummary(path, shard, num_shards, int(manifest["rows"]), int(manifest["tokens"]),
                          float(meta.get("generation_seconds", 0.0)), skipped=True)


def _write_index_if_all_done(directory: Path, num_shards: int) -> None:
    """The merged manifest.json, once every shard 0..n-1 has its manifest (the last shard to finish writes it)."""
    if set(list_shard_manifests(directory)) >= set(range(num_shards)):
        write_index(directory, ROLLOUT_KIND)


def load_models(cfg: Config, params: SamplingParams, checkpoint: Path | None):
    """(tokenizer, student, teacher | None, the teacher's tokenizer | None, their fingerprints for the manifest);
    the vocabulary is checked first."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    student_fp = tokenizer_fingerprint(tokenizer)
    mixed = params.teacher_mix_alpha > 0
    teacher_tok, teacher_fp = _check_teacher_vocabulary(cfg, tokenizer, student_fp) if mixed else (None, None)
    ckpt = None if checkpoint is None else str(checkpoint)
    student = load_student(cfg.model, checkpoint=ckpt, trainable=False)
    teacher = load_teacher(cfg.teacher, cfg.model, checkpoint=ckpt) if mixed else None
    fingerprints = {"student": student_fp, "model": model_fingerprint(student), "checkpoint": ckpt}
    if teacher is not None:
        fingerprints["teacher"] = {
            "tokenizer": teacher_fp, "model": model_fingerprint(teacher), "kind": cfg.teacher.kind
        }
    return tokenizer, student, teacher, teacher_tok, fingerprints


def _sample_shard(cfg: Config, paths: RunPaths, iteration: int, plan: dict[str, Any], show_progress: bool):
    """Load the models, sample every group of the shard, and return (records, manifest meta)."""
    params = sampling_params(cfg)
    checkpoint = student_checkpoint(paths, iteration)
    prompts = iteration_prompts(training_prompts(cfg), cfg.rollout.prompts_per_iteration, iteration, cfg.seed)
    if cfg.rollout.engine == "vllm":
        return _sample_shard_vllm(cfg, iteration, plan, prompts, params, checkpoint, show_progress)
    tokenizer, student, teacher, teacher_tok, fingerprints = load_models(cfg, params, checkpoint)
    own = teacher is not None and teacher_has_own_prompt(cfg)  # the mixing teacher reads its own format
    groups = [(g, prompts[g], prompt_ids(tokenizer, prompts[g], cfg),
               teacher_prompt_ids(teacher_tok, prompts[g], cfg) if own else None)
              for g in range(*plan["group_range"])]
    if not groups:
        log.warning("this rollout shard has no groups (%d shards for %d prompts per iteration); it is written empty",
                    plan["num_shards"], cfg.rollout.prompts_per_iteration)
    started = time.perf_counter()
    records, drift = sample_groups(cfg, iteration, groups, params, student, teacher, tokenizer, show_progress)
    seconds = round(time.perf_counter() - started, 3)  # sampling and the recompute, not the loading
    return records, {**plan, **fingerprints, **drift, "generation_seconds": seconds}


def _sample_shard_vllm(cfg: Config, iteration: int, plan: dict[str, Any], prompts, params: SamplingParams,
                       checkpoint: Path | None, show_progress: bool):
    """(records, manifest meta) of a shard sampled by vLLM (`rollout.engine: vllm`): the engine draws every
    completion with its own seed, shuts down, and the transformers student recomputes `old_logprobs` through
    `sample_groups`, replaying the drawn completions (grpo_kd/engines/vllm_rollout.py)."""
    from grpo_kd.engines.vllm_rollout import sample_with_vllm  # vLLM is optional: imported only when used

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    groups = [(g, prompts[g], prompt_ids(tokenizer, prompts[g], cfg), None) for g in range(*plan["group_range"])]
    rows = [(g, ids, s) for g, _, ids, _ in groups for s in range(cfg.rollout.group_size)]
    seeds = [sample_seed(cfg.seed, iteration, g, s) for g, _, s in rows]
    samples, engine = sample_with_vllm(cfg, checkpoint, [ids for _, ids, _ in rows], seeds, params, tokenizer,
                                       show_progress=show_progress)
    by_seed = dict(zip(seeds, samples))

    def replay(student, prompt_ids, row_seeds, params, **_) -> list[Sample]:  # noqa: ARG001 (sample_batch's form)
        return [by_seed[int(seed)] for seed in row_seeds]

    tokenizer, student, _, _, fingerprints = load_models(cfg, params, checkpoint)
    started = time.perf_counter()
    records, drift = sample_groups(cfg, iteration, groups, params, student, None, tokenizer, show_progress,
                                   sampler=replay, keep_sampler_logprobs=True, recompute=True)
    recompute_seconds = time.perf_counter() - started
    generate_seconds = engine.pop("sampling_seconds")
    log.info("vLLM rollout: %d completions sampled in %.1f s, log-probs recomputed in %.1f s; |vLLM - trainer| "
             "per token: mean %.2e, max %.2e", len(records), generate_seconds, recompute_seconds,
             drift["logprob_drift"]["mean_abs"], drift["logprob_drift"]["max_abs"])
    return records, {**plan, **fingerprints, **drift, "engine": engine,
                     "generation_seconds": round(generate_seconds + recompute_seconds, 3),
                     "sampling_seconds": round(generate_seconds, 3), "recompute_seconds": round(recompute_seconds, 3)}


def sample_groups(cfg, iteration, groups, params, student, teacher, tokenizer, show_progress, *,
                  sampler=sample_batch, keep_sampler_logprobs: bool = False, recompute: bool | None = None):
    """Sample G completions for each (group_id, prompt, prompt_ids, teacher prompt ids | None), `rollout.batch_size`
    prompts at a time, the prompts batched by length (less padding; the seeds make a row's tokens independent of
    its batch) and the records returned in group order.

    `sampler` has `sample_batch`'s form (the vLLM path passes completions it sampled already); with
    `keep_sampler_logprobs` the sampler's own log-probs are stored beside the recomputed ones; `recompute` (default
    `rollout.recompute_logprobs`) recomputes `old_logprobs` with one forward. Returns (records, {"logprob_drift":
    {mean_abs, max_abs}, "logprob_drift_max"}) of |sampler log-prob - old_logprobs| per token.
    """
    from grpo_kd.progress import progress

    eos_ids = eos_token_ids(student, tokenizer)
    pad_id = tokenizer.pad_token_id
    size = cfg.rollout.group_size
    records: list[RolloutRecord] = []
    drift, drift_sum, tokens = 0.0, 0.0, 0
    if recompute is None:
        recompute = cfg.rollout.recompute_logprobs
    if recompute is None:  # where the loop's values and a full forward's differ by more than float rounding
        recompute = teacher is not None or lm_head(student).weight.dtype in (torch.bfloat16, torch.float16)
    batches = list(_batches(sorted(groups, key=lambda group: len(group[2])), cfg.rollout.batch_size))
    for batch in (progress(batches, "rollout") if show_progress else batches):
        rows = [(g, prompt, ids, s) for g, prompt, ids, _ in batch for s in range(size)]
        prompt_ids = [ids for _, _, ids, _ in rows]
        teacher_ids = None if batch[0][3] is None else [t_ids for _, _, _, t_ids in batch for _ in range(size)]
        seeds = [sample_seed(cfg.seed, iteration, g, s) for g, _, _, s in rows]
        samples = sampler(student, prompt_ids, seeds, params, eos_ids=eos_ids, pad_id=pad_id, teacher=teacher,
                          teacher_prompts=teacher_ids)
        if recompute:
            old, student_lp, _ = recorded_logprobs(student, teacher, prompt_ids, samples, params, pad_id, teacher_ids)
        else:  # the sampling loop's values, (R, N) zero-padded
            old, student_lp = collate_logprobs([s.sampling_logprobs for s in samples]), None
        for r, ((g, prompt, ids, s), sample) in enumerate(zip(rows, samples)):
            n = len(sample.completion_ids)
            delta = (old[r, :n] - torch.tensor(sample.sampling_logprobs)).abs()  # (C,)
            drift, drift_sum, tokens = max(drift, float(delta.max())), drift_sum + float(delta.sum()), tokens + n
            records.append(RolloutRecord(
                prompt_id=prompt.id, group_id=g, sample_index=s, prompt_ids=ids,
                completion_ids=sample.completion_ids, old_logprobs=old[r, :n].numpy(),
                finish_reason=sample.finish_reason, prompt_text=prompt.text,
                completion_text=completion_text(tokenizer, sample.completion_ids),
                privileged=prompt.privileged,
                student_logprobs=None if student_lp is None else student_lp[r, :n].numpy(),
                sampler_logprobs=sample.sampling_logprobs if keep_sampler_logprobs else None,
            ))  # fmt: skip
    records.sort(key=lambda record: (record.group_id, record.sample_index))
    stats = {"mean_abs": drift_sum / max(tokens, 1), "max_abs": drift}
    return records, {"logprob_drift": stats, "logprob_drift_max": drift}
