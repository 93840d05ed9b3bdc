"""The run report as a person reads it: curves on one step axis across iterations, iteration boundaries, a
smoothed line, evaluations as lines over iterations (a table alone for one evaluation)."""

from __future__ import annotations

import json
import random

import pytest

from grpo_kd.evaluate.report import learning_curves_figure, moving_average, plot_evaluations, run_order, run_report


def log_rows(iterations: int = 3, steps: int = 4) -> list[dict]:
    """A metrics log of `iterations` x `steps`, written out of order and with one line logged twice (a resume)."""
    rows = [{"iteration": it, "step": s, "epoch": 0, "loss": it + 0.1 * s, "reward": {"total": -s}}
            for it in range(1, iterations + 1) for s in range(1, steps + 1)]
    rows.append({**rows[5], "loss": 99.0})  # iteration 2, step 2 again: the later copy counts
    random.Random(0).shuffle(rows)
    return [{("reward/total" if k == "reward" else k): (v["total"] if k == "reward" else v) for k, v in r.items()}
            for r in rows]


def test_curves_are_monotone_in_x_across_iterations():
    fig, keys, _ = learning_curves_figure(log_rows())
    assert keys == ["loss", "reward/total"]
    for ax in [a for a in fig.axes if a.get_title() in keys]:
        raw = ax.lines[0]
        x = list(raw.get_xdata())
        assert x == list(range(1, 13))  # one global step per optimizer step, no return to step 1
        assert all(b > a for a, b in zip(x, x[1:]))
        boundaries = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--")
        assert boundaries == [4.5, 8.5]
    loss = [a for a in fig.axes if a.get_title() == "loss"][0].lines[0].get_ydata()
    assert loss[5] == 99.0  # the duplicated line keeps its last copy


def test_run_order_without_positions_keeps_the_log_order():
    rows, x, offsets = run_order([{"loss": 1.0}, {"loss": 2.0}])
    assert x == [1.0, 2.0] and offsets == {} and rows[1]["loss"] == 2.0


def test_moving_average_is_centred_and_shrinks_at_the_ends():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 3) == pytest.approx([1.5, 2.0, 3.0, 17 / 3, 7.0])
    assert moving_average([5.0], 7) == [5.0]


def test_smoothing_restarts_with_each_long_iteration():
    fig, _, window = learning_curves_figure(log_rows(iterations=2, steps=30))
    ax = [a for a in fig.axes if a.get_title() == "loss"][0]
    smooth = [line for line in ax.lines[1:] if line.get_linestyle() == "-"]
    assert window == 7 and len(smooth) == 2  # one smoothed piece per iteration
    assert max(smooth[0].get_xdata()) == 30 and min(smooth[1].get_xdata()) == 31


def evaluation(name: str, iteration: int | None, reverse_kl: float) -> dict:
    return {"name": name, "iteration": iteration, "distill": {"reverse_kl": reverse_kl, "forward_kl": 1.0}}


def test_evaluations_are_lines_over_iterations_or_a_table_alone(tmp_path):
    assert plot_evaluations([evaluation("iter_0001", 1, 2.0)], tmp_path / "one.png") == []
    assert not (tmp_path / "one.png").exists()
    evaluations = [evaluation("initial", None, 9.0), evaluation("iter_0000", 0, 3.0), evaluation("iter_0002", 2, 2.5)]
    assert plot_evaluations(evaluations, tmp_path / "two.png") == ["distill/forward_kl", "distill/reverse_kl"]
    assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"


def test_run_report_of_several_iterations(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows()), encoding="utf-8")
    (run / "reports").mkdir()
    (run / "reports" / "eval_iter_0003.json").write_text(json.dumps(evaluation("iter_0003", 3, 2.0)), encoding="utf-8")
    written = run_report(run)
    markdown = written["markdown"].read_text(encoding="utf-8")
    assert "12 optimizer steps over 3 iteration(s)" in markdown and "global optimizer step" in markdown
    assert "| loss | 1.1 | 3.4 | 1.1 | 99 | 1.25 | 26.45 | 3.25 |" in markdown
    assert "| iter_0003 | 1 | 2 |" in markdown and "evaluations" not in written  # one evaluation: a table
