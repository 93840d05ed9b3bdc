"""The rollout store, both teacher-cache formats, the atomic sink, the training reader and verify, without models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo_kd.cache.manifest import CacheError, list_shard_manifests, shard_is_complete
from grpo_kd.cache.reader import CacheReader, completion_hidden, prefetched
from grpo_kd.cache.rollouts import RolloutRecord, RolloutStore, write_rollout_shard
from grpo_kd.cache.spec import CacheSpec, ScoredRows, bf16_bits
from grpo_kd.cache.teacher import TeacherShardSink
from grpo_kd.cache.verify import verify_run
from grpo_kd.paths import RunPaths

VOCAB = {"vocab_size": 50, "vocab_hash": "ab" * 32, "name": "toy"}


def toy_records(groups=range(4), G=3, seed=0, mixed=False):
    rng = np.random.default_rng(seed)
    out = []
    for g in groups:
        for s in reversed(range(G)):  # written out of order on purpose
            C = int(rng.integers(0, 9))
            out.append(RolloutRecord(
                prompt_id=f"p{g}", group_id=g, sample_index=s, prompt_ids=rng.integers(1, 50, 3 + g % 2).tolist(),
                completion_ids=rng.integers(1, 50, C).tolist(), old_logprobs=-rng.random(C),
                finish_reason="stop" if C % 2 else "length", prompt_text=f"prompt {g}", completion_text="x" * C,
                privileged=None if g % 2 else "secret", student_logprobs=-rng.random(C) if mixed else None))
    return out


def fake_scores(store: RolloutStore, shard: int, spec: CacheSpec, order, seed=0) -> ScoredRows:
    """Scores with known values: topk_ids[t] = (token + i) % 50, logprobs descending, summing to <= 1."""
    rng = np.random.default_rng(seed + shard)
    s = store.shard(shard)
    offsets, completion = s.list_column("completion_ids")
    rows = np.asarray(order, np.int64)
    tokens = np.concatenate([completion[offsets[r]:offsets[r + 1]] for r in rows]).astype(np.int64)
    n, k = len(tokens), spec.top_k
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(k + 1), n)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
    token = {"topk_ids": ((tokens[:, None] + np.arange(k)) % 50).astype(np.int32),
             "topk_logprobs": logprobs.astype(np.float16) if spec.logprob_dtype == "float16"
             else bf16_bits(torch.from_numpy(logprobs.copy())),
             "target_logprobs": logprobs[:, 0].copy()}
    if spec.reference:
        token["ref_logprobs"] = -np.ones(n, np.float32)
    counts = s.lengths()[rows].astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    seq = np.array([logprobs[a:a + c, 0].astype(np.float64).sum() for a, c in zip(starts, counts)])
    return ScoredRows(rows, s.table.column("group_id").to_numpy()[rows], counts, seq, token)


def write_cache(run_dir, spec: CacheSpec, chunks=3):
    store = RolloutStore.open(RunPaths.of(run_dir).rollouts(1))
    for s in store.shards:
        order = np.argsort(-s.lengths(), kind="stable")
        manifest = {"teacher": {"tokenizer": VOCAB}, "rollouts": {"sha256": s.manifest["sha256"]}}
        with TeacherShardSink(RunPaths.of(run_dir).teacher(1), s.shard, spec, total_rows=s.num_rows,
                              total_tokens=int(s.lengths().sum()), manifest=manifest) as sink:
            for part in np.array_split(order, chunks):
                sink.add(fake_scores(store, s.shard, spec, part))
    return store


@pytest.fixture()
def run_dir(tmp_path):
    rollouts = RunPaths.of(tmp_path).rollouts(1)
    write_rollout_shard(rollouts, 0, toy_records(range(0, 3)), meta={"student": VOCAB})
    write_rollout_shard(rollouts, 1, toy_records(range(3, 5), seed=1), meta={"student": VOCAB})
    return tmp_path


def test_rollout_store_round_trip(run_dir):
    store = RolloutStore.open(RunPaths.of(run_dir).rollouts(1), verify=True)
    assert len(store) == 15 and store.num_groups == 5 and store.shard_ids == [0, 1]
    expected = sorted(toy_records(range(0, 3)), key=lambda r: (r.group_id, r.sample_index))
    for i, want in enumerate(expected):
        got = store[i]
        assert (got.group_id, got.sample_index, got.prompt_ids) == (want.group_id, want.sample_index, want.prompt_ids)
        assert got.completion_ids == want.completion_ids and got.privileged == want.privileged
        np.testing.assert_allclose(got.old_logprobs, want.old_logprobs, rtol=1e-6)
    assert [len(g) for g in store.iter_groups()] == [3] * 5
    assert store.token_count == sum(len(r.completion_ids) for r in store)
    assert (RunPaths.of(run_dir).rollouts(1) / "manifest.json").is_file()


def test_a_group_split_across_shards_is_refused(run_dir):
    write_rollout_shard(RunPaths.of(run_dir).rollouts(1), 2, toy_records([4]), meta={})
    with pytest.raises(CacheError, match="group 4 appears in rollout shards 1 and 2"):
        RolloutStore.open(RunPaths.of(run_dir).rollouts(1))


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_both_formats_round_trip_into_batches(run_dir, fmt, dtype):
    spec = CacheSpec(format=fmt, top_k=4, logprob_dtype=dtype, reference=True)
    store = write_cache(run_dir, spec)
    paths = RunPaths.of(run_dir)
    reader = CacheReader.open(paths.rollouts(1), paths.teacher(1), student_vocab=VOCAB, require_token_level=True)
    batch = reader.batch([4, 0, 2])
    assert batch.group_ids.tolist() == [4] * 3 + [0] * 3 + [2] * 3
    B, T = batch.completion_ids.shape
    assert batch.teacher_topk_ids.shape == (B, T, 4) and batch.teacher_topk_logprobs.dtype == torch.float32
    tol = 1e-3 if dtype == "float16" else 1e-2
    for b in range(B):
        record = store[int(batch.index[b])]
        C = len(record.completion_ids)
        ids = torch.tensor(record.completion_ids, dtype=torch.int64)
        assert batch.teacher_topk_ids[b, :C, 1].tolist() == ((ids + 1) % 50).tolist()
        assert torch.equal(batch.completion_mask[b], torch.arange(T) < C)
        assert batch.teacher_topk_ids[b, C:].abs().sum() == 0 and batch.ref_logprobs[b, C:].abs().sum() == 0
        torch.testing.assert_close(batch.teacher_topk_logprobs[b, :C, 0], batch.teacher_logprobs[b, :C],
                                   atol=tol * 8, rtol=tol)
        assert batch.teacher_seq_logprob[b].item() == pytest.approx(batch.teacher_logprobs[b, :C].double().sum().item(), abs=1e-4)
        P = int(batch.prompt_lengths[b])
        assert batch.input_ids[b, P:P + C].tolist() == record.completion_ids
    assert batch.student_logprobs is None
    assert verify_run(run_dir).ok


def test_completion_hidden_aligns_with_the_next_token():
    hidden = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)  # value = b * 6 + position
    out = completion_hidden(hidden, torch.tensor([2, 4]), 3)  # (2, 3, 1)
    assert out[..., 0].tolist() == [[1, 2, 3], [9, 10, 11]]  # predicts the token at P + t from P + t - 1


def test_an_interrupted_sink_leaves_nothing_that_looks_finished(run_dir):
    spec = CacheSpec(top_k=4)
    store = RolloutStore.open(RunPaths.of(run_dir).rollouts(1))
    teacher_dir = RunPaths.of(run_dir).teacher(1)
    s = store.shard(0)
    with pytest.raises(RuntimeError):
        with TeacherShardSink(teacher_dir, 0, spec, total_rows=s.num_rows, total_tokens=int(s.lengths().sum()),
                              manifest={}) as sink:
            sink.add(fake_scores(store, 0, spec, [0, 1]))
            raise RuntimeError("killed")
    assert not shard_is_complete(teacher_dir, 0, "arrow") and list(teacher_dir.iterdir()) == []
    with pytest.raises(CacheError, match="wrote 2 rows"):  # closing early is an error, not a short shard
        with TeacherShardSink(teacher_dir, 0, spec, total_rows=s.num_rows, total_tokens=int(s.lengths().sum()),
                              manifest={}) as sink:
            sink.add(fake_scores(store, 0, spec, [0, 1]))
    assert list_shard_manifests(teacher_dir) == {}


def test_reader_refuses_another_vocabulary_and_other_rollouts(run_dir):
    write_cache(run_dir, CacheSpec(top_k=4))
    paths = RunPaths.of(run_dir)
    other = {"vocab_size": 32000, "vocab_hash": "cd" * 32, "name": "student"}
    with pytest.raises(CacheError) as info:
        CacheReader.open(paths.rollouts(1), paths.teacher(1), student_vocab=other)
    assert "toy (V=50, hash abababab)" in str(info.value) and "student (V=32000, hash cdcdcdcd)" in str(info.value)
    write_rollout_shard(paths.rollouts(1), 1, toy_records(range(3, 5), seed=9), meta={})
    with pytest.raises(CacheError, match="made from other rollouts"):
        CacheReader.open(paths.rollouts(1), paths.teacher(1))
    report = verify_run(run_dir)
    assert not report.ok and "part-00001.arrow" in report.problems[0][0]


def test_token_budget_batches_whole_groups_with_read_ahead(run_dir):
    write_cache(run_dir, CacheSpec(top_k=4, format="zarr"))
    paths = RunPaths.of(run_dir)
    reader = CacheReader.open(paths.rollouts(1), paths.teacher(1))
    plan = reader.plan(token_budget=40, shuffle=True, seed=3)
    assert sorted(g for batch in plan for g in batch) == list(range(5))
    sizes = reader.group_lengths()
    for groups in plan:
        assert len(groups) == 1 or sizes[groups, 0].sum() * sizes[groups, 1].max() <= 40
    batches = list(reader.batches(token_budget=40, shuffle=True, seed=3, prefetch=2))
    assert [sorted(set(b.group_ids.tolist())) for b in batches] == \
        [sorted(reader._groups[g].group_id for g in groups) for groups in plan]


def test_read_ahead_passes_errors_through():
    def boom():
        raise ValueError("bad shard")

    items = prefetched(iter([lambda: 1, boom]), 2)
    assert next(items) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(items)


def test_verify_names_bad_values(run_dir):
    spec = CacheSpec(top_k=4)
    write_cache(run_dir, spec)
    teacher_dir = RunPaths.of(run_dir).teacher(1)
    manifest = list_shard_manifests(teacher_dir)[1]
    manifest["rows"] = 99
    from grpo_kd.cache.manifest import write_shard_manifest

    write_shard_manifest(teacher_dir, 1, {k: v for k, v in manifest.items() if k not in ("version", "shard")})
    report = verify_run(run_dir)
    assert [name for name, _ in report.problems] == ["iter_0001/teacher/part-00001.arrow"]
    assert "rows" in report.problems[0][1]
