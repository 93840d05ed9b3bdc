"""`grpo-kd demo`, as a newcomer runs it: from nothing to a before/after table and a plot, offline, on the CPU.

The end-to-end test runs the real command in a fresh directory (it builds its own tiny models) and checks that
the student moved toward the teacher: a higher teacher log-likelihood of its samples and a lower KL on held-out
prompts, with a lower held-out perplexity, and completions no shorter than the teacher's own (shortening past
the teacher is how a reward gets gamed). Its wall time is printed, not asserted (DESIGN.md §4: speed is shown by
measurement, not timed tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from grpo_kd.demo import HELDOUT_EVERY, ROWS, demo_config, write_demo_data
from grpo_kd.tiny import TinyModels


def test_demo_data_holds_out_every_tenth_line(tmp_path):
    data = write_demo_data(tmp_path, None)
    prompts = data.prompts.read_text().splitlines()
    heldout = data.heldout.read_text().splitlines()
    assert abs(len(prompts) - (HELDOUT_EVERY - 1) * len(heldout)) <= HELDOUT_EVERY
    assert not set(prompts) & set(heldout)


def test_demo_config_is_a_valid_run_config(tmp_path):
    models = TinyModels(tmp_path / "t", tmp_path / "s", tmp_path / "k")
    data = write_demo_data(tmp_path, None)
    cfg = demo_config(tmp_path / "run dir", models, data, iterations=2)
    assert cfg.run_dir == tmp_path / "run dir" and cfg.iterations == 2
    assert cfg.teacher.path == str(models.teacher) and cfg.eval.heldout_text == str(data.heldout)


@pytest.mark.slow
def test_demo_from_scratch_improves_the_student(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "COLUMNS": "120"})  # fmt: skip
    print(f"grpo-kd demo: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    for label, *_ in ROWS:
        assert label in done.stderr
    png = out / "run" / "reports" / "demo.png"
    assert png.is_file() and f"plot of the run: {png}" in done.stderr
    before = json.loads((out / "run" / "reports" / "eval_before.json").read_text())
    after = json.loads((out / "run" / "reports" / "eval_after.json").read_text())
    assert after["distill"]["teacher_logprob_mean"] > before["distill"]["teacher_logprob_mean"]
    assert after["distill"]["reverse_kl"] < before["distill"]["reverse_kl"]
    assert after["perplexity"]["perplexity"] < before["perplexity"]["perplexity"]  # held-out text: not trained on
    teacher = json.loads((out / "run" / "reports" / "eval_teacher.json").read_text())
    length = {name: result["diversity"]["mean_length_tokens"] for name, result in
              (("before", before), ("after", after), ("teacher", teacher))}
    assert length["teacher"] <= length["after"] <= 1.25 * length["before"], length  # not shortened past the teacher
    assert "algorithm: on-policy token-level reverse KL" in done.stderr
