"""Issue 13, cases 6, 7 and 8 (the config's part) and 9 (the run name): one line naming the key, before any work.

The value rules are `grpo_kd.config.rules`, which `load_config` runs, so `config validate`, every phase and
`grpo-kd run` refuse the same configs; the rules that need files (the teacher's path and vocabulary) run when a
phase or `grpo-kd run` starts, before the rollout.
"""

from __future__ import annotations

import pytest
import yaml

from grpo_kd.config import ConfigError, load_config
from grpo_kd.errors import GrpoKdError

from .helpers import run_all

CASES = {  # issue case -> (overrides, what the one line must name)
    "6 teacher.num_shards=0": (["teacher.num_shards=0"], "teacher.num_shards"),
    "6 rollout.num_shards=0": (["rollout.num_shards=0"], "rollout.num_shards"),
    "7 optim.lr=-1e-3": (["optim.lr=-1e-3"], "optim.lr"),
    "7 optim.micro_batch_size=0": (["optim.micro_batch_size=0"], "optim.micro_batch_size"),
    "8 teacher.top_k=0": (["teacher.top_k=0"], "teacher.top_k"),
    "8 teacher.temperature=0": (["teacher.temperature=0"], "teacher.temperature"),
    "8 estimate=sampled, num_samples=0": (["loss.algorithm=minillm", "loss.teacher_kl.estimate=sampled",
                                           "loss.teacher_kl.divergence=forward"], "teacher.num_samples"),
    "8 loss.policy.epsilon_low=-0.5": (["loss.policy.epsilon_low=-0.5"], "loss.policy.epsilon_low"),
    "8 loss.policy.beta=-1": (["loss.policy.beta=-1"], "loss.policy.beta"),
    "8 optim.epochs_per_iteration=0": (["optim.epochs_per_iteration=0"], "optim.epochs_per_iteration"),
    "8 GRPO with group_size=1": (["rollout.group_size=1"], "rollout.group_size"),
    "8 PPO-only keys under GRPO": (["loss.ppo.gamma=0.9"], "loss.ppo"),
    "9 name: ../../escape": (["name=../../escape"], "name"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_value_is_refused_when_the_config_is_loaded(tmp_path, case):
    overrides, key = CASES[case]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "run", "output_dir": str(tmp_path / "runs"),
                                    "loss": {"algorithm": "grpo"}}))
    with pytest.raises(ConfigError) as refused:
        load_config(path, overrides)
    message = str(refused.value)
    assert key in message and "\n" not in message, message
    assert not (tmp_path / "runs").exists()


def test_iterations_zero_in_the_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("iterations: 0\n")
    with pytest.raises(ConfigError, match="iterations must be at least 1"):
        load_config(path)


def test_config_validate_lists_every_problem_of_a_file(tmp_path, capsys):
    from grpo_kd.cli.app import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": -1.0, "epochs_per_iteration": 0},
                                    "loss": {"policy": {"beta": -1}}}))
    assert main(["config", "validate", "--schema-only", str(path)]) == 1
    out = capsys.readouterr().out
    for key in ("optim.lr", "optim.epochs_per_iteration", "loss.policy.beta"):
        assert key in out


@pytest.mark.parametrize("overrides, key", [
    ({"teacher.top_k": 5000}, "teacher.top_k=5000"),
    ({"teacher.path": "runs/no-such/teacher"}, "no-such"),
], ids=["teacher.top_k above the vocabulary", "a missing teacher path"])
def test_a_problem_with_the_teacher_is_refused_before_the_rollout(fault_config, overrides, key):
    from grpo_kd.paths import RunPaths

    cfg = fault_config(**overrides)
    with pytest.raises(GrpoKdError) as refused:
        run_all(cfg)
    assert key in str(refused.value)
    assert not RunPaths.of(cfg.run_dir).rollouts(1).exists()


def test_config_validate_checks_the_files_a_config_names(tmp_path, fault_config, capsys):
    from grpo_kd.cli.app import main
    from grpo_kd.config import save_config

    path = tmp_path / "run.yaml"
    save_config(fault_config(**{"teacher.path": str(tmp_path / "no-such-teacher")}), path)
    assert main(["config", "validate", str(path)]) == 1
    assert "no-such-teacher" in capsys.readouterr().out
