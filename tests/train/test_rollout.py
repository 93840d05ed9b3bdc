"""The rollout phase end to end on real tiny Llamas: prompts, shards, the store, idempotence, MiniLLM mixing, CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from grpo_kd.cache.manifest import read_json, shard_manifest_path
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.config import load_config
from grpo_kd.data import Prompt
from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import sha256_file
from grpo_kd.models import load_causal_lm
from grpo_kd.paths import RunPaths
from grpo_kd.shards import resolve_shard, shard_range
from grpo_kd.train.policy import collate, completion_logprobs
from grpo_kd.train.rollout import iteration_prompts, run_rollout, training_prompts

GROUPS, G = 5, 3


@pytest.fixture(scope="session")
def tiny(tiny_models):
    """The shared tiny pair of tests/conftest.py (one tokenizer, pre-trained a few steps)."""
    return tiny_models


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Spurningur {i}: hvat er {i} ferðir {i + 1}?", "answer": str(i * (i + 1))}
            for i in range(12)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _overrides(tiny, prompts_file, run_root, **extra):
    values = {
        "name": "t", "output_dir": str(run_root), "seed": 3,
        "model.path": str(tiny.student), "model.dtype": "float32", "model.device": "cpu",
        "teacher.path": str(tiny.teacher), "teacher.dtype": "float32",
        "data.prompts": str(prompts_file), "data.privileged_field": "answer", "data.heldout_fraction": 0.25,
        "rollout.prompts_per_iteration": GROUPS, "rollout.group_size": G, "rollout.max_new_tokens": 6,
        "rollout.batch_size": 2, "rollout.temperature": 0.9, "optim.micro_batch_size": G,  # steps take whole groups
    }  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _config(tiny, prompts_file, run_root, **extra):
    return load_config(None, _overrides(tiny, prompts_file, run_root, **extra))


def _rows(store):
    return [(r.group_id, r.sample_index, r.prompt_id, list(r.completion_ids), list(r.old_logprobs)) for r in store]


# ---------------------------------------------------------------------------------------------- pure rules


def test_iteration_prompts_cycle_through_seeded_epochs():
    prompts = [Prompt(id=f"p{i}", text=f"t{i}") for i in range(7)]
    first_three = [iteration_prompts(prompts, 3, i, seed=5) for i in (1, 2, 3)]
    assert iteration_prompts(prompts, 3, 2, seed=5) == first_three[1]  # deterministic
    stream = [p.id for chunk in first_three for p in chunk]  # positions 0..8: one epoch, then two of the next
    assert sorted(stream[:7]) == sorted(p.id for p in prompts)
    assert len(set(stream[7:])) == 2
    assert [p.id for p in iteration_prompts(prompts, 3, 1, seed=6)] != [p.id for p in first_three[0]]
    big = iteration_prompts(prompts, 16, 1, seed=5)  # more prompts per iteration than prompts: whole epochs
    assert sorted(p.id for p in big[:7]) == sorted(p.id for p in big[7:14])


def test_training_prompts_leave_out_the_heldout_slice(tiny, prompts_file, tmp_path):
    from grpo_kd.data import prompts_from_config, split_heldout

    cfg = _config(tiny, prompts_file, tmp_path)
    train, held = split_heldout(prompts_from_config(cfg.data), cfg.data.heldout_fraction, cfg.seed)
    assert training_prompts(cfg) == train and held and not set(held) & set(train)
    cfg = _config(tiny, prompts_file, tmp_path, **{"data.heldout_prompts": str(prompts_file)})
    assert len(training_prompts(cfg)) == 12


def test_resolve_shard_from_flags_slurm_and_defaults():
    assert resolve_shard(None, None, 1, env={}) == (0, 1)
    assert resolve_shard(None, None, 4, env={}) == (0, 4)
    assert resolve_shard(2, 3, 1, env={"SLURM_ARRAY_TASK_ID": "0"}) == (2, 3)  # flags win
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard(None, None, 1, env=slurm) == (3, 4)
    offset = {**slurm, "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}  # --array=1-4
    assert resolve_shard(None, None, 1, env=offset) == (3, 4)
    for args, env, message in [
        ((4, 4, 1), {}, "shard 4 is out of range for 4 shard(s)"),
        ((-1, 2, 1), {}, "shard -1 is out of range"),
        ((0, 0, 1), {}, "number of shards must be at least 1"),
        ((None, None, 1), {"SLURM_ARRAY_TASK_ID": "x"}, "SLURM_ARRAY_TASK_ID='x' is not an integer"),
        ((None, None, 2), {"SLURM_ARRAY_TASK_ID": "2"}, "shard 2 is out of range for 2 shard(s)"),
    ]:
        with pytest.raises(GrpoKdError) as info:
            resolve_shard(*args, env=env)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_shard_ranges_cover_every_group_once():
    for items in (1, 5, 16):
        for shards in (1, 2, 3, 7):
            covered = [g for j in range(shards) for g in range(*shard_range(items, j, shards))]
            assert covered == list(range(items))


# ---------------------------------------------------------------------------------------------- the phase


def test_two_shards_cover_all_groups_once_and_equal_one_shard(tiny, prompts_file, tmp_path):
    cfg2 = _config(tiny, prompts_file, tmp_path / "two")
    directory = RunPaths.of(cfg2.run_dir).rollouts(1)
    first = run_rollout(cfg2, 1, shard=1, num_shards=2)
    assert first.name == "part-00001.arrow"
    assert not (directory / "manifest.json").exists()  # the index waits for the last shard
    run_rollout(cfg2, 1, shard=0, num_shards=2)
    index = json.loads((directory / "manifest.json").read_text())
    assert index["num_shards"] == 2 and index["rows"] == GROUPS * G
    store = RolloutStore.open(directory, verify=True)
    assert sorted(g.group_id for g in store.groups()) == list(range(GROUPS))
    assert all(g.size == G for g in store.groups())
    assert [r.sample_index for r in store] == [s for _ in range(GROUPS) for s in range(G)]
    assert {r.finish_reason for r in store} <= {"stop", "length"}
    assert all(r.privileged is not None and r.student_logprobs is None for r in store)

    cfg1 = _config(tiny, prompts_file, tmp_path / "one")
    run_rollout(cfg1, 1)  # randomness is per completion: the shard layout does not change a single token
    assert _rows(RolloutStore.open(RunPaths.of(cfg1.run_dir).rollouts(1))) == _rows(store)

    meta = store.shards[0].manifest["meta"]
    assert meta["iteration"] == 1 and meta["seed"] == 3 and meta["group_range"] == [0, 2]
    assert meta["sampling"]["temperature"] == 0.9 and meta["sampling"]["group_size"] == G
    assert meta["student"]["vocab_size"] > 0 and meta["model"]["architecture"] == "LlamaForCausalLM"
    assert meta["logprob_drift_max"] < 1e-4


def test_old_logprobs_equal_a_fresh_recompute(tiny, prompts_file, tmp_path):
    cfg = _config(tiny, prompts_file, tmp_path, **{"rollout.top_k": 50, "rollout.recompute_logprobs": True})
    store = RolloutStore.open(run_rollout(cfg, 1).parent)
    records = list(store)
    batch = collate([r.prompt_ids for r in records], [r.completion_ids for r in records], pad_id=0)
    student = load_causal_lm(str(tiny.student), dtype="float32", device="cpu")
    with torch.no_grad():
        fresh, _ = completion_logprobs(student, batch, temperature=0.9)  # (R, T)
    for r, record in enumerate(records):
        n = len(record.completion_ids)
        torch.testing.assert_close(torch.tensor(record.old_logprobs), fresh[r, :n], rtol=0, atol=2e-6)
        assert record.prompt_text.startswith("Spurningur")


def test_recompute_in_length_chunks_equals_one_batch(tiny, prompts_file, tmp_path, monkeypatch):
    """The recompute scores rows in length-sorted chunks: the same values as one padded batch (float rounding)."""
    from grpo_kd.train import rollout

    recompute = {"rollout.recompute_logprobs": True}
    one = list(RolloutStore.open(run_rollout(_config(tiny, prompts_file, tmp_path / "a", **recompute), 1).parent))
    monkeypatch.setattr(rollout, "RECOMPUTE_TOKENS", 16)  # a chunk per row or two
    assert rollout._length_chunks([9, 3, 12, 5], 16) == [[2], [0], [3, 1]]  # longest first, <= 16 padded tokens
    chunked_cfg = _config(tiny, prompts_file, tmp_path / "b", **recompute)
    chunked = list(RolloutStore.open(run_rollout(chunked_cfg, 1).parent))
    for a, b in zip(chunked, one):
        assert list(a.completion_ids) == list(b.completion_ids)
        torch.testing.assert_close(torch.tensor(a.old_logprobs), torch.tensor(b.old_logprobs), rtol=0, atol=2e-6)


def test_sampling_loop_logprobs_without_the_recompute(tiny, prompts_file, tmp_path):
    """rollout.recompute_logprobs=false: the same tokens, and the loop's log-probs, within float rounding of the
    recomputed ones; refused with teacher mixing, whose two log-probs come from the recompute."""
    recompute = _config(tiny, prompts_file, tmp_path / "a", **{"rollout.recompute_logprobs": True})
    recomputed = list(RolloutStore.open(run_rollout(recompute, 1).parent))
    cfg = _config(tiny, prompts_file, tmp_path / "b", **{"rollout.recompute_logprobs": False})
    from_loop = list(RolloutStore.open(run_rollout(cfg, 1).parent))
    assert [list(r.completion_ids) for r in from_loop] == [list(r.completion_ids) for r in recomputed]
    for a, b in zip(from_loop, recomputed):
        torch.testing.assert_close(torch.tensor(a.old_logprobs), torch.tensor(b.old_logprobs), rtol=0, atol=2e-5)
    with pytest.raises(GrpoKdError, match="recompute_logprobs=false is not available"):  # the config's rules
        _config(tiny, prompts_file, tmp_path / "c", **{"rollout.recompute_logprobs": False,
                                                       "rollout.teacher_mix_alpha": 0.5})


@pytest.mark.parametrize("dtype, recomputed", [("float32", False), ("bfloat16", True)])
def test_the_default_recomputes_where_the_loop_and_a_forward_differ(tiny, prompts_file, tmp_path, dtype, recomputed):
    """recompute_logprobs unset: a float32 student stores the loop's log-probs (drift 0: nothing recomputed), a
    bfloat16 one recomputes them (drift > 0: the loop's and a full forward's bf16 rounding differ)."""
    cfg = _config(tiny, prompts_file, tmp_path, **{"model.dtype": dtype})
    meta = read_json(shard_manifest_path(run_rollout(cfg, 1).parent, 0))["meta"]
    assert (meta["logprob_drift_max"] > 0) == recomputed, meta["logprob_drift_max"]


def test_rerunning_a_finished_shard_does_nothing(tiny, prompts_file, tmp_path, caplog):
    cfg = _config(tiny, prompts_file, tmp_path)
    path = run_rollout(cfg, 1)
    manifest = shard_manifest_path(path.parent, 0)
    before = (path.stat().st_mtime_ns, sha256_file(path), manifest.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="grpo_kd.train.rollout"):
        assert run_rollout(cfg, 1) == path
    assert "already complete; skipping" in caplog.text
    assert (path.stat().st_mtime_ns, sha256_file(path), manifest.stat().st_mtime_ns) == before

    changed = _config(tiny, prompts_file, tmp_path, **{"rollout.temperature": 0.5})
    with pytest.raises(GrpoKdError, match="made with another sampling"):
        run_rollout(changed, 1)


def test_a_killed_shard_is_redone(tiny, prompts_file, tmp_path):
    cfg = _config(tiny, prompts_file, tmp_path)
    path = run_rollout(cfg, 1)
    good = sha256_file(path)
    manifest = shard_manifest_path(path.parent, 0)
    manifest.unlink()  # killed between the data rename and the manifest: not finished
    (path.parent / "part-00000.arrow.tmp-999").write_bytes(b"half")  # and a leftover of another kill
    path.write_bytes(b"truncated")
    run_rollout(cfg, 1)
    assert manifest.is_file() and sha256_file(path) == good
    assert not (path.parent / "part-00000.arrow.tmp-999").exists()


def test_iteration_two_samples_from_the_update_checkpoint(tiny, prompts_file, tmp_path):
    cfg = _config(tiny, prompts_file, tmp_path)
    with pytest.raises(GrpoKdError, match="the update of iteration 1 is not finished"):
        run_rollout(cfg, 2)
    model = load_causal_lm(str(tiny.student), dtype="float32", device="cpu")
    checkpoint = RunPaths.of(cfg.run_dir).checkpoint(1) / "model"
    model.save_pretrained(checkpoint)
    path = run_rollout(cfg, 2)
    meta = RolloutStore.open(path.parent).shards[0].manifest["meta"]
    assert meta["checkpoint"] == str(checkpoint) and meta["iteration"] == 2


def test_teacher_mixed_rollout_stores_mixture_and_student_logprobs(tiny, prompts_file, tmp_path):
    alpha = 0.4
    cfg = _config(tiny, prompts_file, tmp_path, **{"rollout.teacher_mix_alpha": alpha})
    store = RolloutStore.open(run_rollout(cfg, 1).parent)
    records = list(store)
    assert store.shards[0].manifest["teacher_mixed"] and "teacher" in store.shards[0].manifest["meta"]
    batch = collate([r.prompt_ids for r in records], [r.completion_ids for r in records], pad_id=0)
    student = load_causal_lm(str(tiny.student), dtype="float32", device="cpu")
    teacher = load_causal_lm(str(tiny.teacher), dtype="float32", device="cpu")
    with torch.no_grad():
        q = completion_logprobs(student, batch, temperature=0.9)[0].double().exp()  # (R, T)
        p = completion_logprobs(teacher, batch, temperature=0.9)[0].double().exp()  # (R, T)
    for r, record in enumerate(records):
        n = len(record.completion_ids)
        mixture = torch.log(alpha * p[r, :n] + (1 - alpha) * q[r, :n])
        torch.testing.assert_close(torch.tensor(record.old_logprobs, dtype=torch.float64), mixture, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(record.student_logprobs, dtype=torch.float64), q[r, :n].log(),
                                   rtol=0, atol=1e-5)


def test_teacher_mix_refuses_another_vocabulary(tiny, prompts_file, tmp_path, tiny_student_other_vocab):
    other = tiny_student_other_vocab
    cfg = _config(tiny, prompts_file, tmp_path, **{"model.path": str(other), "rollout.teacher_mix_alpha": 0.5})
    with pytest.raises(GrpoKdError) as info:
        run_rollout(cfg, 1)
    message = str(info.value)
    assert "one vocabulary" in message and str(other) in message and str(tiny.teacher) in message
    assert "V=512" in message and "V=1024" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- command line


def test_cli_rollout_end_to_end(tiny, prompts_file, tmp_path, capsys, monkeypatch):
    from grpo_kd.cli.app import main

    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(f"name: cli\noutput_dir: {tmp_path}\nrollout:\n  group_size: 2\n", encoding="utf-8")
    overrides = [o for o in _overrides(tiny, prompts_file, tmp_path) if not o.startswith(("name=", "output_dir="))]
    overrides = [o for o in overrides if not o.startswith(("rollout.group_size=", "optim.micro_batch_size="))]
    assert main(["rollout", "--config", str(config), *overrides, "--iteration", "1", "--shard", "1",
                 "--num-shards", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "rollout shard 1/2:" in out[0] and "tokens/s" in out[0]
    assert "6 completions" in out[0] and out[0].endswith("part-00001.arrow")  # groups 2..4, G = 2
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(["rollout", "--config", str(config), *overrides]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["rollout", "--config", str(config), *overrides, "--shard", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "shard 5 is out of range for 2 shard(s)" in err and len(err.splitlines()) == 1
