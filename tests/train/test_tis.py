"""Truncated importance sampling (`loss.policy.tis_cap`) for rollouts whose sampler was another engine (vLLM).

The rollouts here carry `sampler_logprobs` = old_logprobs - log 2 on every token (a sampler that gave every
token half the trainer's probability), through the real store, cache pass and update: the weight
min(pi_old / mu, cap) is then 2 (or the cap), so the first step's loss, linear in the advantages, is that
multiple of the uncorrected one, and `tis_weight` is logged.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo_kd.cache.reader import CacheReader
from grpo_kd.cache.rollouts import RolloutStore, write_rollout_shard
from grpo_kd.paths import RunPaths
from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.update import run_update

from ._update_helpers import copy_run, make_config, write_rollouts


@pytest.fixture(scope="module")
def template(tiny_models_quick, tmp_path_factory):
    from grpo_kd.train.teacher_pass import run_teacher_pass

    root = tmp_path_factory.mktemp("tis") / "template"
    cfg = make_config(root, tiny_models_quick, "loss.policy.beta=0.0")
    write_rollouts(cfg)
    directory = RunPaths.of(root).rollouts(1)
    store = RolloutStore.open(directory)
    records = list(store)
    for record in records:
        record.sampler_logprobs = [lp - math.log(2.0) for lp in record.old_logprobs]
    meta = store.shards[0].manifest["meta"]
    write_rollout_shard(directory, 0, records, meta=meta)
    run_teacher_pass(cfg, iteration=1, progress=False)
    return root


@pytest.fixture(scope="module")
def uncorrected(template, tiny_models_quick, tmp_path_factory):
    """The update without the correction (loss.policy.tis_cap 0, the default): its first-step loss and metrics."""
    run = copy_run(template, tmp_path_factory.mktemp("tis") / "base")
    run_update(make_config(run, tiny_models_quick, "loss.policy.beta=0.0"), 1)
    return MetricsLog(RunPaths.of(run).metrics).read()[0]


def test_store_and_reader_carry_sampler_logprobs(template):
    paths = RunPaths.of(template)
    store = RolloutStore.open(paths.rollouts(1))
    assert store.shards[0].manifest["sampler_logprobs"]
    record = store[0]
    assert len(record.sampler_logprobs) == len(record.completion_ids)
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch([0])
    valid = batch.completion_mask
    delta = (batch.old_logprobs - batch.sampler_logprobs)[valid]
    assert torch.allclose(delta, torch.full_like(delta, math.log(2.0)), atol=1e-6)


def test_without_a_cap_nothing_is_weighted(uncorrected):
    assert "tis_weight" not in uncorrected


@pytest.mark.parametrize("cap, weight", [(10.0, 2.0), (1.5, 1.5)])
def test_tis_weight_scales_the_surrogate(template, uncorrected, tiny_models_quick, tmp_path, cap, weight):
    run = copy_run(template, tmp_path / "run")
    run_update(make_config(run, tiny_models_quick, "loss.policy.beta=0.0", f"loss.policy.tis_cap={cap}"), 1)
    first = MetricsLog(RunPaths.of(run).metrics).read()[0]
    assert first["tis_weight"] == pytest.approx(weight, rel=1e-5)
    assert first["loss"] == pytest.approx(weight * uncorrected["loss"], rel=1e-4, abs=1e-7)
