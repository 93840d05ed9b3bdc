"""`grpo-kd cache-teacher` on tiny models: the cache equals a plain full-logit teacher forward."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo_kd.cache.manifest import CacheError
from grpo_kd.cache.reader import CacheReader
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cache.teacher import open_teacher_shards
from grpo_kd.cli.app import main
from grpo_kd.paths import RunPaths

from .cache_helpers import make_run

FP16_TOL = 1e-2  # |fp16(x) - x| <= 2^-11 |x| for the log-probs of a tiny model (|x| < 20)


def full_logprobs(model_path, prompt_ids, completion_ids) -> torch.Tensor:
    """(C, V) float32 log-probs of the teacher at the completion positions, from a plain forward."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # position P+t-1 predicts token t
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, cache_models):
    root = tmp_path_factory.mktemp("pass")
    config, run_dir = make_run(root, cache_models, num_prompts=4, group_size=3, num_shards=2,
                               teacher={"num_samples": 4})
    assert main(["cache-teacher", "--config", str(config), "--iteration", "1"]) == 0
    return config, run_dir


def test_cache_equals_a_full_logit_forward(scored_run, cache_models):
    _, run_dir = scored_run
    paths = RunPaths.of(run_dir)
    store = RolloutStore.open(paths.rollouts(1))
    reader = CacheReader.open(paths.rollouts(1), paths.teacher(1))
    batch = reader.batch(list(range(reader.num_groups)))
    model = AutoModelForCausalLM.from_pretrained(str(cache_models.teacher), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(str(cache_models.student), dtype=torch.float32).eval()
    for b in range(len(batch.index)):
        record = store[int(batch.index[b])]
        C = len(record.completion_ids)
        ids = torch.tensor([list(record.prompt_ids) + list(record.completion_ids)])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0, len(record.prompt_ids) - 1 : -1].float(), -1)  # (C, V)
            base = torch.log_softmax(student(ids).logits[0, len(record.prompt_ids) - 1 : -1].float(), -1)
        target = torch.tensor(record.completion_ids)
        # exact sampled-token log-probs (float32)
        torch.testing.assert_close(batch.teacher_logprobs[b, :C], ref.gather(1, target[:, None])[:, 0],
                                   atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(batch.ref_logprobs[b, :C], base.gather(1, target[:, None])[:, 0],
                                   atol=2e-5, rtol=1e-5)
        # top-k log-probs within float16 rounding; ids equal up to near-ties
        top_vals, top_ids = ref.topk(8, dim=-1)
        cached = batch.teacher_topk_logprobs[b, :C]
        torch.testing.assert_close(cached, top_vals, atol=FP16_TOL, rtol=0)
        same_id = batch.teacher_topk_ids[b, :C] == top_ids
        gaps = ref.gather(1, batch.teacher_topk_ids[b, :C]) - top_vals
        assert bool((same_id | (gaps.abs() < 1e-5)).all())
        assert batch.teacher_seq_logprob[b].item() == pytest.approx(float(ref.gather(1, target[:, None]).sum()),
                                                                    abs=1e-3)
        # padding and masks
        assert bool(batch.completion_mask[b, :C].all()) and not bool(batch.completion_mask[b, C:].any())
        assert batch.input_ids[b, batch.prompt_lengths[b] : batch.prompt_lengths[b] + C].tolist() == \
            list(record.completion_ids)
        # m samples: weights are counts / m; their log-probs are the teacher's full-vocabulary ones at those ids
        w = batch.teacher_sample_weights[b, :C]
        assert torch.allclose(w.sum(-1), torch.ones(C)) and bool(((w * 4) == (w * 4).round()).all())
        sample_ids = batch.teacher_sample_ids[b, :C]  # (C, m)
        torch.testing.assert_close(batch.teacher_sample_logprobs[b, :C], ref.gather(1, sample_ids),
                                   atol=2e-5, rtol=1e-5)
        assert batch.teacher_sample_logprobs[b, C:].abs().sum() == 0  # padding


def test_rerun_does_nothing(scored_run, capsys):
    config, run_dir = scored_run
    teacher_dir = RunPaths.of(run_dir).teacher(1)
    before = {p.name: p.stat().st_mtime_ns for p in teacher_dir.iterdir()}
    assert main(["cache-teacher", "--config", str(config), "--iteration", "1"]) == 0
    assert "already complete: 0, 1" in capsys.readouterr().out.replace("\n", " ")
    assert {p.name: p.stat().st_mtime_ns for p in teacher_dir.iterdir()} == before


def test_zarr_holds_the_same_cache(scored_run, tmp_path):
    config, run_dir = scored_run
    zarr_dir = tmp_path / "zrun"
    import shutil

    shutil.copytree(RunPaths.of(run_dir).rollouts(1), RunPaths.of(zarr_dir).rollouts(1))
    overrides = [f"output_dir={tmp_path}", "name=zrun", "teacher.cache_format=zarr"]
    assert main(["cache-teacher", "--config", str(config), "--iteration", "1", *overrides]) == 0
    assert main(["cache", "verify", str(zarr_dir)]) == 0
    a = CacheReader.open(RunPaths.of(run_dir).rollouts(1), RunPaths.of(run_dir).teacher(1)).batch([0, 1, 2, 3])
    b = CacheReader.open(RunPaths.of(zarr_dir).rollouts(1), RunPaths.of(zarr_dir).teacher(1)).batch([0, 1, 2, 3])
    for name, x in a._asdict().items():
        y = getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert open_teacher_shards(RunPaths.of(zarr_dir).teacher(1))[0].path.suffix == ".zarr"


def test_verify_names_a_flipped_byte(scored_run, tmp_path, capsys):
    import shutil

    _, run_dir = scored_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shard = RunPaths.of(copy).teacher(1) / "part-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["cache", "verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "BAD  iter_0001/teacher/part-00001.arrow: checksum mismatch" in out
    assert "ok   iter_0001/teacher/part-00000.arrow" in out


@pytest.mark.parametrize("corrupt,why", [
    (lambda x: x - 0.5, "sample_logprobs differ from the top-k log-probs"),  # still <= 0 and finite
    (lambda x: x + 50.0, "a sample log-prob above 0"),
    (lambda x: x * float("nan"), "NaN or inf in sample_logprobs"),
])
def test_verify_catches_corrupted_sample_logprobs(scored_run, tmp_path, capsys, corrupt, why):
    """A writer that stored wrong sample log-probs under a valid checksum: verify names the shard and the field."""
    import shutil

    import numpy as np
    import pyarrow as pa

    from grpo_kd.cache.manifest import checksum, list_shard_manifests, write_shard_manifest

    _, run_dir = scored_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    teacher_dir = RunPaths.of(copy).teacher(1)
    shard = teacher_dir / "part-00001.arrow"
    table = pa.ipc.open_file(pa.BufferReader(shard.read_bytes())).read_all()  # in memory: the file is rewritten
    column = table.column("sample_logprobs").combine_chunks()
    values = corrupt(column.values.to_numpy().copy()).astype(np.float32)
    fixed = pa.ListArray.from_arrays(column.offsets, pa.array(values))
    table = table.set_column(table.schema.get_field_index("sample_logprobs"), table.schema.field("sample_logprobs"),
                             fixed)
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    manifest = list_shard_manifests(teacher_dir)[1]
    manifest["sha256"] = checksum(shard)
    write_shard_manifest(teacher_dir, 1, {k: v for k, v in manifest.items() if k not in ("version", "shard")})
    assert main(["cache", "verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"BAD  iter_0001/teacher/part-00001.arrow: {why}" in out
    assert "ok   iter_0001/teacher/part-00000.arrow" in out


def test_stats_writes_json_and_png(scored_run):
    _, run_dir = scored_run
    assert main(["cache", "stats", str(run_dir)]) == 0
    stats = json.loads((run_dir / "reports" / "cache_stats_iter_0001.json").read_text())
    assert 0 < stats["topk_mass"]["quantiles"]["q50"] <= 1.0
    assert stats["entropy_nats"]["lower_mean"] <= stats["entropy_nats"]["upper_mean"]
    assert 0 <= stats["agreement"]["student_token_is_teacher_top1"] <= 1
    assert (run_dir / "reports" / "cache_stats_iter_0001.png").read_bytes()[:4] == b"\x89PNG"


def test_student_with_another_vocabulary_is_refused(scored_run, tmp_path):
    from grpo_kd.models import load_tokenizer, tokenizer_fingerprint
    from grpo_kd.tiny import build_tiny_student

    _, run_dir = scored_run
    other = build_tiny_student(tmp_path / "other", vocab_size=300)
    fp = tokenizer_fingerprint(load_tokenizer(str(other)))
    paths = RunPaths.of(run_dir)
    with pytest.raises(CacheError) as info:
        CacheReader.open(paths.rollouts(1), paths.teacher(1), student_vocab=fp)
    message = str(info.value)
    assert "V=300" in message and "V=1024" in message and fp["vocab_hash"][:8] in message


def test_teacher_with_another_vocabulary(scored_run, tmp_path, capsys):
    """No setting needed: its log-probs are aligned onto the student's tokens (tests/test_xtok.py has the rule);
    the cache has no top-k, so a loss that needs one is refused naming both vocabularies; the key of the
    sequence-only mode of earlier versions is refused with the reason."""
    import shutil

    from grpo_kd.tiny import build_tiny_student

    config, run_dir = scored_run
    other = build_tiny_student(tmp_path / "other-teacher", vocab_size=300)
    xrun = tmp_path / "xrun"
    shutil.copytree(RunPaths.of(run_dir).rollouts(1), RunPaths.of(xrun).rollouts(1))
    overrides = [f"output_dir={tmp_path}", "name=xrun", f"teacher.path={other}"]
    assert main(["cache-teacher", "--config", str(config), *overrides, "teacher.cross_tokenizer=true"]) == 1
    assert "teacher.cross_tokenizer was removed" in capsys.readouterr().err
    assert main(["cache-teacher", "--config", str(config), *overrides]) == 0
    assert main(["cache", "verify", str(xrun)]) == 0
    reader = CacheReader.open(RunPaths.of(xrun).rollouts(1), RunPaths.of(xrun).teacher(1))
    batch = reader.batch([0])
    assert batch.teacher_topk_ids is None and batch.ref_logprobs is not None
    mask = batch.completion_mask
    assert (batch.teacher_logprobs[mask] <= 0).all() and batch.teacher_seq_bytes.min() > 0
    torch.testing.assert_close(batch.teacher_logprobs.double().sum(1), batch.teacher_seq_logprob, atol=1e-4, rtol=0)
    with pytest.raises(CacheError, match="no top-k over the student's vocabulary") as info:
        CacheReader.open(RunPaths.of(xrun).rollouts(1), RunPaths.of(xrun).teacher(1), require_token_level=True)
    assert "V=300" in str(info.value) and "V=1024" in str(info.value)


def test_privileged_self_teacher_rebuilds_the_prompt(tmp_path, cache_models):
    from transformers import AutoTokenizer

    config, run_dir = make_run(tmp_path, cache_models, num_prompts=2, group_size=2, num_shards=1,
                               privileged=True, teacher={"kind": "self_privileged", "reference": False,
                                                         "prompt_template": "{privileged}\n{prompt}"})
    assert main(["cache-teacher", "--config", str(config)]) == 0
    paths = RunPaths.of(run_dir)
    store = RolloutStore.open(paths.rollouts(1))
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch([0, 1])
    tok = AutoTokenizer.from_pretrained(str(cache_models.student))
    for b in range(len(batch.index)):
        record = store[int(batch.index[b])]
        prompt = tok(f"{record.privileged}\n{record.prompt_text}")["input_ids"]
        ref = full_logprobs(cache_models.student, prompt, record.completion_ids)
        C = len(record.completion_ids)
        expected = ref.gather(1, torch.tensor(record.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(batch.teacher_logprobs[b, :C], expected, atol=2e-5, rtol=1e-5)
    assert batch.ref_logprobs is None
