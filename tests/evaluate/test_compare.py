"""`grpo-kd compare`: grouping by seed, the spread over seeds checked by hand, the best checkpoint, which differences
exceed the seed spread, and the outputs; on run directories written as the phases and `grpo-kd evaluate` write them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from grpo_kd.cli.app import main
from grpo_kd.config import load_config, save_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate.compare import compare_runs
from grpo_kd.evaluate.compare_report import comparison_markdown, write_comparison
from grpo_kd.evaluate.spread import overlap, spread, t_quantile


def make_run(root: Path, name: str, seed: int, reverse_kl: dict[int, float], reward: float = -3.0, *extra: str) -> Path:
    """RUN/config.yaml, two iterations of two optimizer steps, and an evaluation per iteration in `reverse_kl`."""
    run = root / name
    save_config(load_config(None, [f"name={name}", f"output_dir={root}", f"seed={seed}", *extra]), run / "config.yaml")
    rows = [{"iteration": it, "step": s, "epoch": 0, "loss": 0.5, "reward/total": reward + it + 0.1 * s, "src": "cache"}
            for it in (1, 2) for s in (1, 2)]
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for it, value in reverse_kl.items():
        result = {"checkpoint": str(run / "checkpoints" / f"iter_{it:04d}"), "iteration": it,
                  "distill": {"reverse_kl": value, "forward_kl": 2 * value}}
        (run / "reports").mkdir(exist_ok=True)  # the JSON of save_evaluation (its PNG is not read)
        (run / "reports" / f"eval_iter_{it:04d}.json").write_text(json.dumps({"name": f"iter_{it:04d}", **result}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    tmp_path = tmp_path_factory.mktemp("runs")
    a = [make_run(tmp_path, f"grpo_s{seed}", seed, {0: 4.0, 1: 3.0 + d, 2: 2.0 + d})
         for seed, d in enumerate((0.0, 0.1, 0.2))]
    b = [make_run(tmp_path, f"ppo_s{seed}", seed, {0: 4.0, 2: 3.9 + d}, -3.0, "loss.algorithm=ppo")
         for seed, d in enumerate((0.0, 0.1))]
    c = [make_run(tmp_path, "minillm_s0", 0, {0: 4.0, 2: 1.0}, -3.0, "loss.algorithm=minillm")]
    return a + b + c


def test_t_quantiles_match_the_published_table():
    for df, value in {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 30: 2.042}.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def test_spread_by_hand():
    s = spread([2.0, 2.1, 2.2])
    half = t_quantile(0.975, 2) * 0.1 / math.sqrt(3)  # sd of 2.0, 2.1, 2.2 is 0.1
    assert (s.mean, s.low, s.high, s.n) == pytest.approx((2.1, 2.1 - half, 2.1 + half, 3))
    assert (spread([1.0, 5.0, 2.0], "minmax").low, spread([1.0, 5.0, 2.0], "minmax").high) == (1.0, 5.0)
    assert overlap(spread([1.0]), spread([1.0, 2.0])) is None


def test_runs_that_differ_only_in_seed_form_a_group(runs):
    comparison = compare_runs(runs)
    assert [g.label for g in comparison.groups] == ["grpo", "ppo", "minillm"]
    assert [[r.seed for r in g.runs] for g in comparison.groups] == [[0, 1, 2], [0, 1], [0]]
    assert comparison.groups[1].settings["loss.algorithm"] == "ppo"
    assert comparison.metrics == ["distill/forward_kl", "distill/reverse_kl", "train/reward/total"]
    grpo = comparison.groups[0]
    assert grpo.spread("distill/reverse_kl", 2, "t95").mean == pytest.approx(2.1)
    assert grpo.spread("train/reward/total", 1, "t95").mean == pytest.approx(-1.85)  # mean of the steps' rewards


def test_best_checkpoint_and_differences(runs):
    comparison = compare_runs(runs, metrics=["distill/reverse_kl"])
    best = {b.run: (b.iteration, b.value) for b in comparison.best}
    assert comparison.best_metric == "distill/reverse_kl" and best["grpo_s1"] == (2, 2.1) and best["ppo_s0"] == (2, 3.9)
    assert [b.checkpoint for b in comparison.best if b.run == "grpo_s0"] == [str(runs[0] / "checkpoints" / "iter_0002")]
    verdict = {(d.group, d.against): d.beyond_spread for d in comparison.differences}
    assert verdict[("grpo", "iteration 0")] is True  # 2.1 +- 0.25 against 4.0 +- 0: beyond the spread
    assert verdict[("ppo", "iteration 0")] is False  # 3.95 +- 0.64 (two seeds 0.1 apart) covers 4.0
    assert verdict[("ppo", "grpo")] is True and verdict[("minillm", "grpo")] is None  # one minillm run: not judged
    delta = {(d.group, d.against): d.delta for d in comparison.differences}
    assert delta[("ppo", "grpo")] == pytest.approx(3.95 - 2.1)


def test_named_groups_and_the_outputs(runs, tmp_path):
    comparison = compare_runs({"GRPO": runs[:3], "PPO": runs[3:5]}, metrics=["distill/reverse_kl"], method="minmax",
                              best="distill/forward_kl:max")
    assert comparison.best[0].iteration == 0  # the largest forward KL: the initial model
    paths = write_comparison(comparison, tmp_path / "out", "study")
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["values"]["distill/reverse_kl"]["PPO"]["2"] == {"mean": pytest.approx(3.95), "low": 3.9,
                                                                 "high": 4.0, "n": 2, "values": [3.9, 4.0]}
    markdown = paths["md"].read_text(encoding="utf-8")
    assert markdown == comparison_markdown(comparison, "study.png")
    assert "| GRPO | 4 [4, 4] (n=3) | 3.1 [3, 3.2] (n=3) | 2.1 [2, 2.2] (n=3) |" in markdown
    assert "min-max range" in markdown and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_an_evaluation_against_another_model_and_extra_numbers(tmp_path):
    """An evaluation with `"against": "base"` (the run's samples scored by its frozen base) sits beside the
    teacher's under `base:`, and a caller's `extra` numbers are metrics like a suite's."""
    run = make_run(tmp_path, "sd_s0", 0, {0: 4.0, 2: 3.0})
    result = {"iteration": 2, "against": "base", "distill": {"reverse_kl": 0.5, "teacher_logprob_mean": -7.0},
              "extra": {"informed": {"reverse_kl": 0.25}}}
    (run / "reports" / "eval_iter_0002_vs_base.json").write_text(json.dumps(result))
    comparison = compare_runs([run], metrics=["distill/reverse_kl", "base:distill/reverse_kl",
                                              "base:informed/reverse_kl"])
    (group,) = comparison.groups
    assert [group.spread(m, 2, "t95").mean for m in comparison.metrics] == [3.0, 0.5, 0.25]
    assert comparison.best_metric == "distill/reverse_kl" and comparison.best[0].direction == "min"
    assert "## base:distill/reverse_kl (lower is better)" in comparison_markdown(comparison)


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    with pytest.raises(GrpoKdError, match="is in none of the runs; they have: distill/forward_kl"):
        compare_runs(runs, metrics=["distill/nope"])
    with pytest.raises(GrpoKdError, match="say which way is better"):
        compare_runs(runs, best="train/loss_weird")
    assert main(["compare", str(tmp_path / "missing")]) == 1
    assert "run directory not found" in capsys.readouterr().err


def test_command_line(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--metric", "distill/reverse_kl,train/reward/total", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 runs in 3 groups" in printed and "## train/reward/total (higher is better)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md", "comparison.png"]
