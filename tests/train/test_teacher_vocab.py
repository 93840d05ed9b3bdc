"""A teacher with another vocabulary: what cannot run with it is refused by `grpo-kd run` and by any phase before
it starts, with the reason; what can run needs no setting (tests/test_family_runs.py runs it)."""

from __future__ import annotations

import pytest
import yaml

from grpo_kd.cli.app import main
from grpo_kd.config import ALGORITHMS, load_config
from grpo_kd.train import algorithms
from grpo_kd.train.teacher_vocab import foreign_teacher_refusal


def test_the_rule_reads_what_the_algorithms_need():
    """Rule 1 names the algorithms by the loss section they read (`loss.teacher_kl`): exactly those whose loss
    needs the teacher's top-k over the student's vocabulary."""
    for name in ALGORITHMS:
        refused = foreign_teacher_refusal(load_config(None, [f"loss.algorithm={name}"])) is not None
        assert refused == algorithms.get(name).NEEDS_TOKEN_LEVEL, name
    assert "teacher_mix_alpha" in foreign_teacher_refusal(load_config(None, ["rollout.teacher_mix_alpha=0.2"]))


@pytest.mark.parametrize("overrides, says", [
    (["loss.algorithm=minillm"], "loss.algorithm=minillm reads the teacher's next-token distribution"),
    (["loss.algorithm=privileged"], "loss.algorithm=privileged reads"),
    (["rollout.teacher_mix_alpha=0.2"], "rollout.teacher_mix_alpha=0.2 mixes"),
], ids=["minillm", "privileged", "teacher-mixing"])
def test_refused_before_any_phase(tmp_path, tiny_models_quick, tiny_student_other_vocab, capsys, overrides, says):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "run", "output_dir": str(tmp_path), "model": {"path": str(tiny_student_other_vocab)},
        "teacher": {"path": str(tiny_models_quick.teacher)}, "data": {"prompts": "unused.txt"}}))
    for command in (["run"], ["rollout", "--iteration", "1"]):
        assert main([*command, "--config", str(config), *overrides]) == 1
        err = capsys.readouterr().err
        assert says in err and "another vocabulary" in err and "V=512" in err and "V=1024" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
