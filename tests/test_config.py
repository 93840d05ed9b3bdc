"""The config schema: every shipped file loads, overrides apply, and mistakes fail with one line."""

from pathlib import Path

import pytest

from grpo_kd.config import ConfigError, load_config, to_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    cfg = load_config(path)
    assert load_config(path) == cfg  # deterministic
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(saved) == cfg  # what a run directory saves loads back as the same config


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["loss.policy.beta=0.5", "slurm.update.nodes=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_dotted_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  policy:\n    beta: 0.1\nrollout:\n  group_size: 2\n", encoding="utf-8")
    cfg = load_config(path, ["loss.policy.beta=0.04", "teacher.softcap=30", "model.lora_target_modules=[q_proj]"])
    assert cfg.loss.policy.beta == 0.04
    assert cfg.rollout.group_size == 2
    assert cfg.teacher.softcap == 30.0
    assert cfg.model.lora_target_modules == ["q_proj"]


def test_minillm_has_no_kl_to_a_reference_unless_asked(tmp_path):
    """MiniLLM's objective (reverse KL to the teacher + L_PT) has no KL-to-reference term: its beta defaults to 0
    (schema.ALGORITHM_DEFAULTS), in the shipped config too; a file or an override that sets beta keeps it, and the
    other algorithms keep the schema's default."""
    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(None, ["loss.algorithm=minillm"]).loss.policy.beta == 0.0
    assert load_config(root / "minillm.yaml").loss.reference_beta == 0.0
    assert load_config(root / "minillm.yaml", ["loss.policy.beta=0.1"]).loss.policy.beta == 0.1
    path = tmp_path / "m.yaml"
    path.write_text("loss:\n  algorithm: minillm\n  policy:\n    beta: 0.2\n", encoding="utf-8")
    assert load_config(path).loss.policy.beta == 0.2
    assert load_config(None, ["loss.algorithm=grpo"]).loss.policy.beta == load_config(None).loss.policy.beta > 0


def test_ints_are_accepted_for_floats_but_not_the_reverse():
    assert load_config(None, ["loss.policy.beta=1"]).loss.policy.beta == 1.0
    with pytest.raises(ConfigError, match="rollout.group_size: expected int"):
        load_config(None, ["rollout.group_size=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.betta=1", "unknown config key loss.betta; did you mean loss.policy.beta?"),
        ("modle.path=x", "unknown config key modle; did you mean model?"),
        ("loss.policy.beta=high", "loss.policy.beta: expected float, got str 'high'"),
        ("loss.policy.loss_type=dappo", "did you mean 'dapo'?"),
        ("model.lora=3", "model.lora: expected bool"),
        ("loss=3", "loss: expected a mapping"),
        ("nokey", "not of the form section.key=value"),
        ("sft.plain_text=true", "sft.plain_text needs sft.source"),
        ("sft.enabled=true", "sft.source is empty, so phase 0 trains on data.prompts with their continuation"),
        ("sft.epochs=0", "sft.epochs must be at least 1"),
    ],
)
def test_mistakes_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_misspelt_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_sise: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="rollout.group_sise; did you mean rollout.group_size"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads `1e-5` as a string; a float field still takes it, and words still fail."""
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 1e-5\n", encoding="utf-8")
    assert load_config(path).optim.lr == 1e-5
    assert load_config(None, ["optim.lr=3e-3"]).optim.lr == 3e-3
    with pytest.raises(ConfigError, match="optim.lr: expected float, got str 'e-3'"):
        load_config(None, ["optim.lr=e-3"])
