"""The kernel benchmark's bookkeeping (no timing here): rounds merge into one row per case, and the time ratio
against eager is the median of the per-round ratios, so one slow round of either method cannot decide it."""

import pytest

from grpo_kd.kernels.bench import merge_rounds
from grpo_kd.kernels.bench_report import judge


def _rounds(method: str, times, peaks):
    base = dict(kernel="sparse_kl", method=method, N=8, H=4, V=16, dtype="float32", device="cpu", status="ok",
                value=1.0)
    return [{**base, "time_ms": t, "times_ms": [t, t + 1], "peak_bytes": p} for t, p in zip(times, peaks)]


def test_rounds_pair_up_against_eager():
    twin = merge_rounds(_rounds("grpo-kd", (10.0, 30.0, 12.0), (5, 7, 6)))
    eager = merge_rounds(_rounds("eager", (10.0, 10.0, 30.0), (100, 100, 100)))
    judge([twin, eager])
    assert twin["round_times_ms"] == [10.0, 30.0, 12.0] and twin["time_ms"] == 12.0 and twin["peak_bytes"] == 7
    assert twin["round_ratios"] == pytest.approx([1.0, 3.0, 0.4]) and twin["time_vs_eager"] == pytest.approx(1.0)
    assert len(twin["times_ms"]) == 6 and twin["memory_vs_eager"] == pytest.approx(0.07)
    assert "time <= 1.5x eager: met" in twin["targets"]


def test_a_failed_round_fails_the_case():
    rows = _rounds("grpo-kd", (10.0, 11.0), (5, 5))
    rows[1] = {**rows[1], "status": "error", "note": "worker exited 1"}
    assert merge_rounds(rows)["status"] == "error"
