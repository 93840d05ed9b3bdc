"""What vLLM cannot do is refused in one line before any phase runs; no engine is started here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from grpo_kd.config import ConfigError, load_config
from grpo_kd.errors import GrpoKdError


@pytest.mark.parametrize("overrides, words", [
    (["rollout.engine=vllm", "rollout.teacher_mix_alpha=0.3"], "teacher-mixed sampling"),
    (["teacher.engine=vllm", "teacher.num_samples=4"], "teacher.num_samples"),
    (["teacher.engine=vllm", "teacher.temperature=0.7"], "teacher.temperature=0.7"),
    (["teacher.engine=vllm", "teacher.device_map=auto"], "teacher.device_map"),
    (["loss.policy.tis_cap=-1"], "loss.policy.tis_cap"),
    (["vllm.gpu_memory_utilization=1.5"], "vllm.gpu_memory_utilization"),
])
def test_config_rules_refuse_what_vllm_cannot_do(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
    load_config(None, [o for o in overrides if "engine" in o])  # the engine alone is fine


def test_config_validate_names_the_rule(tmp_path):
    bad = tmp_path / "mixed.yaml"
    bad.write_text("rollout: {engine: vllm, teacher_mix_alpha: 0.5}\n")
    out = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "config", "validate", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "teacher-mixed sampling" in out.stdout


def test_checkpoint_fingerprint_is_the_loaded_models(tiny_models):
    from grpo_kd.engines.vllm_engine import checkpoint_fingerprint
    from grpo_kd.models import load_causal_lm, model_fingerprint

    for path in (tiny_models.teacher, tiny_models.student):  # untied and tied embeddings
        loaded = model_fingerprint(load_causal_lm(str(path), dtype="float32", device="cpu"))
        read = checkpoint_fingerprint(str(path))
        assert {k: read[k] for k in ("architecture", "num_parameters", "config_hash")} == \
               {k: loaded[k] for k in ("architecture", "num_parameters", "config_hash")}


@pytest.mark.vllm
def test_preflight_refuses_unserved_models_before_any_phase(tiny_models, vllm_models, needs_vllm, tmp_path):
    from grpo_kd.engines.vllm_engine import preflight

    # a head size the CPU attention lacks (the default tiny models: 24), through `grpo-kd run`
    prompts = tmp_path / "p.txt"
    prompts.write_text("one two three\nfour five six\n")
    args = [f"model.path={tiny_models.student}", f"teacher.path={tiny_models.teacher}", f"data.prompts={prompts}",
            "data.format=text", f"output_dir={tmp_path / 'runs'}", "name=r", "teacher.engine=vllm"]
    out = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "run", *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ})
    assert out.returncode == 1, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "head size 24" in error[0] and "teacher.engine=hf" in error[0]
    assert not (tmp_path / "runs" / "r").exists()  # refused before the run directory, let alone a phase

    # an architecture vLLM has no implementation of
    odd = tmp_path / "odd"
    shutil.copytree(vllm_models.student, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchLlamaForCausalLM"]}))
    with pytest.raises(GrpoKdError, match="no implementation of NoSuchLlamaForCausalLM"):
        preflight(load_config(None, [f"model.path={odd}", "rollout.engine=vllm"]))
    preflight(load_config(None, [f"model.path={vllm_models.student}", f"teacher.path={vllm_models.teacher}",
                                 "rollout.engine=vllm", "teacher.engine=vllm"]))  # served: no error


def test_tiny_models_head_dim_option_leaves_the_default_build_alone(tiny_models_quick, vllm_models):
    from transformers import AutoConfig

    for role in ("teacher", "student"):
        config = AutoConfig.from_pretrained(getattr(vllm_models, role))
        assert config.head_dim == 32 and config.num_attention_heads == 4
        default = AutoConfig.from_pretrained(getattr(tiny_models_quick, role))
        assert default.head_dim == default.hidden_size // default.num_attention_heads  # 24 and 12, as before
    params = json.loads((tiny_models_quick.teacher.parent / "build.json").read_text())["params"]
    assert "head_dim" not in params["teacher_arch"]  # builds made before the option stay valid
