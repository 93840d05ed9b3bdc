"""Issue 13, cases 1, 7 (`cache stats`) and 9: a damaged or swapped shard is never trained on.

Every reader checks the sha256 a shard's manifest records before using it; `grpo-kd run` counts a shard that
fails its checksum as not done and writes it again, which gives the same bytes as the clean run (the phases are
deterministic), so the retrained checkpoint is bit-identical to the clean one.
"""

from __future__ import annotations

import shutil

import pytest

from grpo_kd.cache.manifest import checksum, read_json, shard_manifest_path
from grpo_kd.errors import GrpoKdError

from .helpers import flip_bit, run_all, weights


def _matches_manifest(directory, shard: int = 0) -> bool:
    recorded = read_json(shard_manifest_path(directory, shard))["sha256"]
    return checksum(directory / f"part-{shard:05d}.arrow") == recorded


def _assert_retrained_like_the_clean_run(paths, finished_run) -> None:
    assert _matches_manifest(paths.rollouts(2)) and _matches_manifest(paths.teacher(2))
    clean, again = weights(finished_run.checkpoint(2)), weights(paths.checkpoint(2))
    assert all((clean[k] == again[k]).all() for k in clean)


def test_a_flipped_bit_in_a_teacher_shard_is_scored_again_by_run(damaged_copy, finished_run):
    cfg, paths = damaged_copy
    shutil.rmtree(paths.checkpoint(2))
    flip_bit(paths.teacher(2) / "part-00000.arrow")
    run_all(cfg)
    _assert_retrained_like_the_clean_run(paths, finished_run)


def test_a_flipped_bit_in_a_rollout_shard_is_sampled_again_by_run(damaged_copy, finished_run):
    cfg, paths = damaged_copy
    shutil.rmtree(paths.checkpoint(2))
    flip_bit(paths.rollouts(2) / "part-00000.arrow")
    run_all(cfg)
    _assert_retrained_like_the_clean_run(paths, finished_run)


def test_swapped_teacher_files_of_two_iterations_are_not_trained_on(damaged_copy, finished_run):
    cfg, paths = damaged_copy
    shutil.rmtree(paths.checkpoint(2))
    first, second = paths.teacher(1) / "part-00000.arrow", paths.teacher(2) / "part-00000.arrow"
    swap = first.with_name("swap")
    first.rename(swap), second.rename(first), swap.rename(second)
    run_all(cfg)
    _assert_retrained_like_the_clean_run(paths, finished_run)


def test_the_update_alone_refuses_a_damaged_shard_and_names_the_command_that_rebuilds_it(damaged_copy):
    from grpo_kd.train.phases import run_phase

    cfg, paths = damaged_copy
    shutil.rmtree(paths.checkpoint(2))
    flip_bit(paths.teacher(2) / "part-00000.arrow")
    with pytest.raises(GrpoKdError) as refused:
        run_phase(cfg, "update", 2, resume=True)
    message = str(refused.value)
    assert "part-00000.arrow" in message and "sha256" in message and "\n" not in message
    assert "grpo-kd cache-teacher --config" in message and "--iteration 2" in message
    assert not paths.checkpoint(2).exists()


def test_cache_stats_on_a_swapped_cache_is_one_line(damaged_copy, capsys):
    from grpo_kd.cli.app import main

    _, paths = damaged_copy
    first, second = paths.teacher(1) / "part-00000.arrow", paths.teacher(2) / "part-00000.arrow"
    swap = first.with_name("swap")
    first.rename(swap), second.rename(first), swap.rename(second)
    assert main(["cache", "stats", str(paths.root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "sha256" in err[0]


def test_a_flipped_byte_in_a_checkpoint_is_refused_where_it_is_loaded(damaged_copy):
    from grpo_kd.train.phases import run_phase

    cfg, paths = damaged_copy
    flip_bit(paths.checkpoint(2) / "model" / "model.safetensors", where=0.7)
    cfg.iterations = 3
    with pytest.raises(GrpoKdError) as refused:
        run_phase(cfg, "rollout", 3)  # samples with the student of iteration 2
    assert "model.safetensors" in str(refused.value) and "checksums.json" in str(refused.value)
    assert not (paths.rollouts(3) / "part-00000.arrow").exists()
