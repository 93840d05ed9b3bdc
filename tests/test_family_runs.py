"""Every student-teacher pairing of the experiments, in miniature, through `grpo-kd run` (two iterations each).

Mistral student with the Gemma-3 teacher (another vocabulary: its log-probs aligned onto the student's tokens,
the teacher's chat format) with GRPO and each reward and with PPO; LLaMA
student with the LLaMA chat teacher (one vocabulary, token-level cache, the teacher's chat format); GPT-2 (GPT-SW3)
student with LoRA on its Conv1D layers and fully fine-tuned in bfloat16 (float32 master weights) with the Gemma-3
teacher; and on every family self-distillation and the privileged self-teacher. A failure in any family fails CI.
"""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pytest
import yaml
from safetensors.torch import load_file

from grpo_kd.cli.app import main
from grpo_kd.models import load_tokenizer
from grpo_kd.paths import RunPaths
from grpo_kd.tiny import BUILTIN_CORPUS
from grpo_kd.tiny_families import FAMILIES

pytestmark = pytest.mark.slow

GPT2_LORA = ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D projections
ITERATIONS = 2


def _run(tmp_path, name: str, student, **sections) -> RunPaths:
    """`grpo-kd run --in-process` for two tiny iterations; `sections` update the config's sections."""
    raw = {
        "name": name, "output_dir": str(tmp_path), "iterations": ITERATIONS,
        "model": {"path": str(student)},
        "teacher": {"top_k": 8},
        "data": {"prompts": str(BUILTIN_CORPUS), "format": "text", "prefix_words": 4},
        "rollout": {"prompts_per_iteration": 4, "group_size": 2, "max_new_tokens": 8, "batch_size": 4},
        "optim": {"lr": 1.0e-3, "micro_batch_size": 8},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", "--config", str(config), "--in-process"]) == 0
    return RunPaths.of(tmp_path / name)


def _check_run(paths: RunPaths, student, *, token_level: bool) -> None:
    """Both iterations wrote rollouts of real token ids, a cache of the expected kind, a checkpoint and metrics."""
    vocab = len(load_tokenizer(str(student)))
    for iteration in range(1, ITERATIONS + 1):
        table = pa.ipc.open_file(paths.rollouts(iteration) / "part-00000.arrow").read_all()
        ids = [i for row in table.column("completion_ids").to_pylist() for i in row]
        assert ids and max(ids) < vocab  # never a padding row of the head
        manifest = json.loads((paths.teacher(iteration) / "part-00000.manifest.json").read_text())
        assert manifest["token_level"] is token_level
        assert paths.checkpoint(iteration).is_dir()
    steps = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert len(steps) >= ITERATIONS and all(step["loss"] == step["loss"] for step in steps)  # finite, not NaN


def _changed(before: dict, after: dict, key: str) -> bool:
    return not (before[key].float() == after[key].float()).all()


FOREIGN_TEACHER_LOSSES = {  # every algorithm that can run with a teacher of another vocabulary
    "grpo": {"algorithm": "grpo"},
    "grpo-minillm-reward": {"algorithm": "grpo", "reward": {"kind": "minillm"}},
    "ppo": {"algorithm": "ppo", "reward": {"weights": {"teacher_loglik": 1.0, "log_ratio": 1.0}}},
}


@pytest.mark.parametrize("loss", FOREIGN_TEACHER_LOSSES, ids=list(FOREIGN_TEACHER_LOSSES))
def test_mistral_student_gemma3_teacher(tmp_path, tiny_family, loss):
    """Different vocabularies, no setting for it: the teacher's log-probs aligned onto the student's tokens after
    Gemma's chat prompt feed every reward (per token for PPO and the MiniLLM-style reward)."""
    student, teacher = tiny_family("mistral").student, tiny_family("gemma3").teacher
    paths = _run(tmp_path, f"mistral-gemma3-{loss}", student, loss=FOREIGN_TEACHER_LOSSES[loss],
                 teacher={"path": str(teacher), "chat_template": True})
    _check_run(paths, student, token_level=False)
    manifest = json.loads((paths.teacher(1) / "part-00000.manifest.json").read_text())
    assert manifest["spec"]["alignment"] == "last-byte"
    steps = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    rewarded = "reward/log_ratio" if loss != "grpo" else "reward/teacher_loglik"
    assert all(step[rewarded] == step[rewarded] for step in steps)  # present and finite


def test_llama_student_llama_chat_teacher(tmp_path, tiny_family):
    """One vocabulary, a chat teacher: top-k cache of the teacher reading the prompt in its own chat format."""
    models = tiny_family("llama")
    paths = _run(tmp_path, "llama-chat", models.student, teacher={"path": str(models.teacher), "chat_template": True})
    _check_run(paths, models.student, token_level=True)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-bf16"])
def test_gpt2_student_gemma3_teacher(tmp_path, tiny_family, lora):
    """GPT-SW3's architecture: LoRA on Conv1D, or a full fine-tune in bfloat16 whose updates land through float32
    master weights kept in the optimizer state."""
    student, teacher = tiny_family("gpt2").student, tiny_family("gemma3").teacher
    model = {"lora": True, "lora_target_modules": GPT2_LORA, "lora_r": 4} if lora else {"dtype": "bfloat16"}
    paths = _run(tmp_path, f"gpt2-{'lora' if lora else 'full'}", student, model=model, optim={"lr": 1.0e-4},
                 teacher={"path": str(teacher), "chat_template": True})
    _check_run(paths, student, token_level=False)
    saved = paths.checkpoint(ITERATIONS) / "model"
    if lora:
        adapter = load_file(str(saved / "adapter_model.safetensors"))
        assert any("c_attn" in k for k in adapter) and any("mlp.c_fc" in k for k in adapter)
        return
    before, after = load_file(str(student / "model.safetensors")), load_file(str(saved / "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert after[key].dtype.is_floating_point and str(after[key].dtype) == "torch.bfloat16" and _changed(before, after, key)
    state = load_file(str(paths.checkpoint(ITERATIONS) / "optimizer.safetensors"))
    masters = [v for k, v in state.items() if k.endswith(".master")]
    assert masters and all(str(v.dtype) == "torch.float32" for v in masters)


LORA = {"llama": {}, "mistral": {}, "gemma3": {}, "gpt2": {"lora_target_modules": GPT2_LORA}}


@pytest.mark.parametrize("arch", FAMILIES)
def test_self_distillation(tmp_path, tiny_family, arch):
    """The frozen base (adapters off) scores the student's completions: inverse-loss reward, KL to reference."""
    student = tiny_family(arch).student
    paths = _run(tmp_path, f"self-{arch}", student, model={"lora": True, "lora_r": 4, **LORA[arch]},
                 teacher={"kind": "self_base"}, loss={"algorithm": "self_distill", "policy": {"beta": 0.1}})
    _check_run(paths, student, token_level=True)


@pytest.mark.parametrize("arch", FAMILIES)
def test_privileged_self_teacher(tmp_path, tiny_family, arch):
    """The initial student with the rest of the sentence before its prompt teaches the student without it."""
    student = tiny_family(arch).student
    paths = _run(tmp_path, f"privileged-{arch}", student,
                 teacher={"kind": "self_privileged", "reference": False},
                 loss={"algorithm": "privileged"})
    _check_run(paths, student, token_level=True)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_student(tmp_path, tiny_family):
    """model.load_in_4bit: a frozen NF4 base (bitsandbytes' CPU backend here) under LoRA adapters, self-distilled;
    the base's projections are 4-bit and the LM head, which the kernels read, stays in its float dtype."""
    from grpo_kd.config import ModelConfig
    from grpo_kd.models import lm_head, load_student

    student = tiny_family("mistral").student
    paths = _run(tmp_path, "qlora", student, model={"lora": True, "lora_r": 4, "load_in_4bit": True},
                 teacher={"kind": "self_base"}, loss={"algorithm": "self_distill", "policy": {"beta": 0.1}})
    _check_run(paths, student, token_level=True)
    model = load_student(ModelConfig(path=str(student), lora=True, load_in_4bit=True), trainable=False)
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj.base_layer")} == {"Linear4bit"}
    assert str(lm_head(model).weight.dtype) == "torch.float32"
