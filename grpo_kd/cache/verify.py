"""`grpo-kd cache verify`: is every rollout and teacher shard of a run whole, consistent and sane?

Per iteration, per shard, it checks and names what is wrong:
- rollouts: the file's sha256 against its manifest, row and token counts, and values: the recorded log-probs
  finite and <= 0 (a student with NaN weights samples NaN log-probs);
- teacher: a shard for every rollout shard, no unfinished shard (data without a manifest), sha256, the schema
  its manifest's spec implies, that it scored the very rollout file present (checksum) with every row exactly
  once, token counts and group ids row by row against the rollouts, and values: finite, log-probs <= 0, top-k
  log-probs sorted, top-k mass <= 1 (+ `MASS_TOL` for float16/bfloat16 rounding), the sampled token's log-prob
  no larger than the top-1 (+ tolerance), the per-sequence sum equal to the per-token log-probs, sample
  weights summing to one, sample log-probs <= 0 and equal to the top-k's where a drawn id is in the top-k;
  for a teacher of another vocabulary, the alignment records (`_check_alignment`): the manifest names the rule,
  each row's student tokens hold all of its teacher tokens and cover all of its completion text's bytes (against
  the rollout's `completion_text`), a token that holds no teacher token has the value 0, flags are 0 or 1.
A run that passes gets its merged `teacher/manifest.json` index written (verify is a single process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grpo_kd.cache.manifest import (
    INDEX_NAME,
    CacheError,
    checksum,
    list_shard_manifests,
    shard_data_path,
    tmp_leftovers,
    write_index,
)
from grpo_kd.cache.progress import kept_batch_files, kept_reference_files
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cache.spec import TEACHER_KIND, CacheSpec, stored_logprobs_as_float32
from grpo_kd.cache.teacher import open_shard_reader
from grpo_kd.cache.values import LOGPROB_TOL, logprob_problem, row_sums
from grpo_kd.paths import RunPaths
MASS_TOL = {"float16": 5e-3, "bfloat16": 3e-2}  # top-k mass may exceed 1 by this much
SUM_TOL = 1e-3  # relative tolerance of seq_logprob against the sum of target log-probs
SAMPLE_REL_TOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7}  # sample vs top-k log-prob of one id (rounding)


@dataclass
class VerifyReport:
    ok_shards: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard file, what is wrong)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad(self, name: str, why: str) -> None:
        self.problems.append((name, why))

    def lines(self) -> list[str]:
        out = [f"ok   {name}" for name in self.ok_shards]
        out += [f"BAD  {name}: {why}" for name, why in self.problems]
        out += [f"note {note}" for note in self.notes]
        verdict = "cache verify: OK" if self.ok else f"cache verify: FAILED ({len(self.problems)} problem(s))"
        return out + [verdict]


def iterations_of(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(run_dir).glob("iter_[0-9][0-9][0-9][0-9]") if p.is_dir())


def verify_run(run_dir: str | Path, iteration: int | None = None) -> VerifyReport:
    run_dir = Path(run_dir)
    report = VerifyReport()
    if not run_dir.is_dir():
        report.bad(str(run_dir), "run directory not found")
        return report
    iterations = [iteration] if iteration is not None else iterations_of(run_dir)
    if not iterations:
        report.bad(str(run_dir), "no iter_XXXX directories")
    for it in iterations:
        before = len(report.problems)
        verify_iteration(RunPaths.of(run_dir), it, report)
        teacher_dir = RunPaths.of(run_dir).teacher(it)
        if len(report.problems) == before and list_shard_manifests(teacher_dir):
            write_index(teacher_dir, TEACHER_KIND)
    return report


def verify_iteration(paths: RunPaths, iteration: int, report: VerifyReport) -> None:
    rollouts_dir, teacher_dir = paths.rollouts(iteration), paths.teacher(iteration)
    rel = lambda p: str(Path(p).relative_to(paths.root))  # noqa: E731
    store = _verify_rollouts(rollouts_dir, report, rel)
    if store is None:
        return
    manifests = {j: m for j, m in list_shard_manifests(teacher_dir).items()}
    for leftover in tmp_leftovers(teacher_dir):
        report.notes.append(f"{rel(leftover)}: temporary leftover of an interrupted writer (ignored)")
    for rollout in store.shards:
        if rollout.shard not in manifests:
            unfinished = [p for p in teacher_dir.glob(f"part-{rollout.shard:05d}.*") if ".tmp-" not in p.name] \
                if teacher_dir.is_dir() else []
            what = "unfinished: data without a manifest" if unfinished else "missing (no manifest)"
            kept = len(kept_batch_files(teacher_dir, rollout.shard))
            kept_reference = len(kept_reference_files(teacher_dir, rollout.shard))
            if kept or kept_reference:
                what += (f"; {kept} scored batches (and {kept_reference} reference batches) are kept for the next "
                         "`grpo-kd cache-teacher` to resume from")
            report.bad(rel(teacher_dir / f"part-{rollout.shard:05d}"), f"teacher shard {what}")
    for j, manifest in sorted(manifests.items()):
        name = rel(teacher_dir / manifest.get("file", f"part-{j:05d}"))
        try:
            why = _check_teacher_shard(teacher_dir, j, manifest, store)
        except CacheError as exc:
            why = str(exc)
        except Exception as exc:  # a damaged file can fail anywhere inside pyarrow / zarr
            why = f"unreadable ({type(exc).__name__}: {exc})"
        if why:
            report.bad(name, why)
        else:
            report.ok_shards.append(f"{name}  rows {manifest['rows']}  tokens {manifest['tokens']}")


def _verify_rollouts(rollouts_dir: Path, report: VerifyReport, rel) -> RolloutStore | None:
    manifests = list_shard_manifests(rollouts_dir)
    if not manifests:
        report.bad(rel(rollouts_dir), "no finished rollout shards")
        return None
    good = True
    for j, manifest in manifests.items():
        path = shard_data_path(rollouts_dir, j, "arrow")
        if not path.is_file():
            report.bad(rel(path), "rollout shard listed by its manifest but missing")
            good = False
        elif checksum(path) != manifest.get("sha256"):
            report.bad(rel(path), "checksum does not match its manifest (file changed or damaged)")
            good = False
    if not good:
        return None
    try:
        store = RolloutStore.open(rollouts_dir, verify=False)  # the checksums were checked just above
    except Exception as exc:
        report.bad(rel(rollouts_dir), f"rollouts unreadable: {exc}")
        return None
    for shard in store.shards:
        if shard.num_rows != shard.manifest.get("rows") or int(shard.lengths().sum()) != shard.manifest.get("tokens"):
            report.bad(rel(shard.path), "row or token count differs from its manifest")
        for name in ("old_logprobs", "student_logprobs"):
            why = logprob_problem(name, shard.list_column(name)[1]) if shard.num_rows else None
            if why:
                report.bad(rel(shard.path), f"{why}: the student that sampled it was broken, or the file was changed")
    return store


def _check_teacher_shard(teacher_dir: Path, j: int, manifest: dict, store: RolloutStore) -> str | None:
    """None when shard j is sound, else what is wrong with it (the first problem found)."""
    if manifest.get("kind") != TEACHER_KIND:
        return f"manifest kind is {manifest.get('kind')!r}, not {TEACHER_KIND!r}"
    spec = CacheSpec.from_dict(manifest["spec"])
    path = shard_data_path(teacher_dir, j, spec.suffix)
    if not path.exists():
        return "data file listed by its manifest is missing"
    actual = checksum(path)
    if actual != manifest.get("sha256"):
        return f"checksum mismatch (manifest {str(manifest.get('sha256'))[:12]}, file {actual[:12]}): file damaged"
    if j not in store.shard_ids:
        return f"scores rollout shard {j}, which does not exist"
    rollout = store.shard(j)
    if manifest.get("rollouts", {}).get("sha256") != rollout.manifest.get("sha256"):
        return f"was made from other rollouts than {rollout.path.name} (rollout checksums differ)"
    reader = open_shard_reader(path, spec)
    rows = reader.rows()
    if reader.num_rows != rollout.num_rows or manifest.get("rows") != rollout.num_rows:
        return f"{reader.num_rows} rows (manifest {manifest.get('rows')}) but the rollout shard has {rollout.num_rows}"
    if not np.array_equal(np.sort(rows), np.arange(rollout.num_rows)):
        return "rows are not each rollout row exactly once"
    if not np.array_equal(reader.row_values("num_tokens"), rollout.lengths()):
        return "per-row token counts differ from the rollouts' completion lengths"
    if not np.array_equal(reader.row_values("group_id"), rollout.table.column("group_id").to_numpy()):
        return "group ids differ from the rollouts' (rows misaligned)"
    if int(reader.row_values("num_tokens").sum()) != manifest.get("tokens"):
        return "token count differs from its manifest"
    if spec.alignment is not None:
        why = _check_alignment(reader, spec, manifest, rollout)
        if why:
            return why
    return _check_values(reader, spec)


def _check_values(reader, spec: CacheSpec) -> str | None:
    names = list(spec.token_fields())
    tol = MASS_TOL[spec.logprob_dtype]
    for chunk in reader.iter_token_chunks(names):
        if not np.isfinite(chunk["seq_logprob"]).all():
            return "non-finite seq_logprob"
        for name in names:
            values = chunk[name]
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"NaN or inf in {name}"
        if spec.token_level:
            top = chunk["topk_logprobs"]
            top = stored_logprobs_as_float32(top)
            if not np.isfinite(top).all():
                return "NaN or inf in topk_logprobs"
            if (top > LOGPROB_TOL).any() or (chunk["target_logprobs"] > LOGPROB_TOL).any():
                return "a log-prob above 0"
            if (np.diff(top, axis=1) > tol).any():
                return "top-k log-probs are not sorted in descending order"
            mass = np.exp(top.astype(np.float64)).sum(axis=1)
            if (mass > 1 + tol).any():
                return f"top-k probability mass up to {mass.max():.4f} > 1"
            if len(top) and (chunk["target_logprobs"] > top[:, 0] + tol * 10 + 1e-2).any():
                return "a sampled-token log-prob above the teacher's top-1"
            if (chunk["topk_ids"] < 0).any():
                return "negative token id in topk_ids"
            if spec.num_samples:
                why = _check_samples(chunk, top, spec)
                if why:
                    return why
        elif (chunk["seq_logprob"] > LOGPROB_TOL).any():
            return "a sequence log-prob above 0"
        if "target_logprobs" in chunk:
            if (chunk["target_logprobs"] > LOGPROB_TOL).any():
                return "a target log-prob above 0"
            if not np.allclose(row_sums(chunk["target_logprobs"], chunk["num_tokens"]), chunk["seq_logprob"], rtol=SUM_TOL, atol=1e-3):
                return "seq_logprob differs from the sum of its target log-probs"
        if spec.reference and (chunk["ref_logprobs"] > LOGPROB_TOL).any():
            return "a reference log-prob above 0"
    return None


def _check_alignment(reader, spec: CacheSpec, manifest: dict, rollout) -> str | None:
    """The alignment records of a teacher with another vocabulary (see the module doc)."""
    recorded = (manifest.get("alignment") or {}).get("rule")
    if recorded != spec.alignment or not spec.cross_tokenizer:
        return f"the manifest records alignment rule {recorded!r} but the spec {spec.alignment!r}"
    texts = rollout.table.column("completion_text").to_pylist()
    names = ["target_logprobs", "xtok_bytes", "xtok_teacher_tokens", "xtok_straddled"]
    for chunk in reader.iter_token_chunks(names):
        held, covered = row_sums(chunk["xtok_teacher_tokens"], chunk["num_tokens"]), row_sums(chunk["xtok_bytes"], chunk["num_tokens"])
        if not np.array_equal(held, chunk["xtok_num_tokens"]):
            return "the student tokens do not hold every teacher token of their row (xtok_teacher_tokens)"
        if not np.array_equal(covered, chunk["xtok_num_bytes"]):
            return "the student tokens do not cover every byte of their completion text (xtok_bytes)"
        text_bytes = [len(texts[int(r)].encode("utf-8")) for r in chunk["row"]]
        if not np.array_equal(chunk["xtok_num_bytes"], text_bytes):
            return "xtok_num_bytes differs from the UTF-8 length of the rollouts' completion_text"
        if (chunk["xtok_bytes"] < 0).any() or (chunk["xtok_teacher_tokens"] < 0).any():
            return "a negative byte or teacher-token count in the alignment records"
        if not np.isin(chunk["xtok_straddled"], (0, 1)).all():
            return "xtok_straddled holds a value other than 0 and 1"
        if (chunk["target_logprobs"][chunk["xtok_teacher_tokens"] == 0] != 0).any():
            return "a student token that holds no teacher token has a non-zero target log-prob"
    return None


def _check_samples(chunk: dict, top: np.ndarray, spec: CacheSpec) -> str | None:
    """The m teacher samples: weights sum to one, ids >= 0, log-probs <= 0, and a drawn id that is also in the
    top-k has the top-k's log-prob (within the top-k's half-precision rounding, `SAMPLE_REL_TOL`)."""
    ids, weights, logprobs = chunk["sample_ids"], chunk["sample_weights"], chunk["sample_logprobs"]
    if not np.allclose(weights.sum(axis=1), 1.0, atol=1e-4) or (weights < 0).any():
        return "sample weights do not sum to one (or are negative)"
    if (ids < 0).any():
        return "negative token id in sample_ids"
    if (logprobs > LOGPROB_TOL).any():
        return "a sample log-prob above 0"
    for lo in range(0, len(ids), 4096):  # (n, m, k) booleans at a time
        block = slice(lo, lo + 4096)
        same = (ids[block, :, None] == chunk["topk_ids"][block, None, :]) & (weights[block, :, None] > 0)
        token, slot, rank = np.nonzero(same)
        want = top[block][token, rank]
        gap = np.abs(logprobs[block][token, slot] - want)
        if (gap > 1e-3 + SAMPLE_REL_TOL[spec.logprob_dtype] * np.abs(want)).any():
            return f"sample_logprobs differ from the top-k log-probs of the same ids (by up to {gap.max():.3g})"
    return None


__all__ = ["VerifyReport", "verify_run", "verify_iteration", "INDEX_NAME"]
