"""`grpo-kd plan`: it passes every shipped config, refuses each wrong one with one line naming the keys, and its
memory model agrees with the published figures of the experiments' models. No model is loaded: the plan reads
config.json files (the shipped facts of configs/models/, or the tiny models' directories) and tokenizers."""

import json
from pathlib import Path

import pytest

from grpo_kd.arch import arch_facts
from grpo_kd.cli.app import main
from grpo_kd.config import load_config
from grpo_kd.slurm.memory import GIB, weight_bytes
from grpo_kd.slurm.planner import make_plan

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = sorted((ROOT / "configs").glob("*.yaml"))  # the study's configs (hub ids) and tiny.yaml
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))  # the tiny Faroese experiments


def _plan(capsys, config: Path, *overrides: str) -> tuple[int, str]:
    code = main(["plan", "--config", str(config), *overrides])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())  # rich wraps long lines: compare words


def _tiny(models) -> list[str]:
    return [f"model.path={models.student}", f"teacher.path={models.teacher}"]


@pytest.mark.parametrize("config", [c for c in CLUSTER if c.name != "tiny.yaml"], ids=lambda c: c.name)
def test_every_cluster_config_passes_offline_from_the_shipped_facts(config, capsys):
    code, out = _plan(capsys, config)
    assert code == 0, out
    assert "plan ok" in out and "shipped facts" in out and "does not fit" not in out


@pytest.mark.parametrize("config", [ROOT / "configs" / "tiny.yaml", *EXPERIMENTS], ids=lambda c: c.name)
def test_every_tiny_config_passes_with_its_models_built(config, tiny_models_quick, capsys):
    code, out = _plan(capsys, config, *_tiny(tiny_models_quick))
    assert code == 0, out
    assert "plan ok" in out and "local directory" in out


def test_a_missing_local_model_is_refused(tmp_path, capsys):
    code, out = _plan(capsys, ROOT / "configs" / "tiny.yaml", f"model.path={tmp_path / 'nowhere'}")
    assert code == 1 and "student not found" in out


def test_an_unknown_hub_id_is_described_as_unresolved_not_refused(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "privileged.yaml", "model.path=someone/not-shipped-7b")
    assert code == 0, out
    assert "unresolved" in out and "its memory is not estimated" in out


def test_another_vocabulary_serves_what_it_can_and_refuses_the_rest(tiny_models_quick, tiny_student_other_vocab,
                                                                     capsys):
    """The tokenizers compared token by token: a foreign teacher needs no setting for GRPO (its log-probs are
    aligned onto the student's tokens); a loss that reads its top-k is refused, naming both vocabularies."""
    overrides = [f"model.path={tiny_models_quick.student}", f"teacher.path={tiny_student_other_vocab}"]
    code, out = _plan(capsys, ROOT / "configs" / "tiny.yaml", *overrides)
    assert code == 0 and "different: teacher log-probs aligned by bytes" in out, out
    code, out = _plan(capsys, ROOT / "configs" / "tiny.yaml", *overrides, "loss.algorithm=minillm")
    assert code == 1 and "has another vocabulary" in out and "loss.algorithm=minillm reads" in out and "V=512" in out


def test_another_vocabulary_from_the_shipped_facts(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "grpo.yaml")
    assert code == 0 and "262208 embedding rows against the student's 32000" in " ".join(out.split()), out
    code, out = _plan(capsys, ROOT / "configs" / "grpo.yaml", "rollout.teacher_mix_alpha=0.2", "rollout.engine=hf")
    assert code == 1
    assert "google/gemma-3-27b-it has another vocabulary (262208 embedding rows against the student's 32000" in out
    assert "rollout.teacher_mix_alpha=0.2 mixes" in out


def test_mismatched_shard_counts_are_refused_by_plan_and_by_validate(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "grpo.yaml", "rollout.num_shards=1")
    assert code == 1 and "teacher.num_shards=8 is more than rollout.num_shards=1" in out
    assert main(["config", "validate", "--schema-only", str(ROOT / "configs" / "grpo.yaml")]) == 0
    capsys.readouterr()
    with pytest.raises(Exception, match="teacher.num_shards=8 is more than rollout.num_shards=1"):
        load_config(ROOT / "configs" / "grpo.yaml", ["rollout.num_shards=1"])


def test_gpus_a_phase_does_not_use_are_refused(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "grpo_minillm_reward.yaml", "teacher.engine=hf")  # 4 GPUs a task
    assert code == 1 and "teacher.engine=hf without teacher.device_map uses one" in out
    code, out = _plan(capsys, ROOT / "configs" / "privileged.yaml", "slurm.cache_teacher.gpus_per_node=2")
    assert code == 1 and "a self-teacher (teacher.kind=self_privileged) with teacher.engine=hf runs on one" in out
    code, out = _plan(capsys, ROOT / "configs" / "privileged.yaml", "slurm.rollout.gpus_per_node=2")
    assert code == 1 and "rollout.engine=hf samples on one" in out


def test_a_teacher_that_does_not_fit_its_gpus_is_refused(capsys):
    config = ROOT / "configs" / "grpo_minillm_reward.yaml"  # LLaMA-2-70B-chat in bf16 over vLLM
    code, out = _plan(capsys, config, "slurm.cache_teacher.gpus_per_node=1")
    assert code == 1 and "cache-teacher does not fit" in out and "slurm.gpu_memory_gb=80" in out
    code, out = _plan(capsys, config, "slurm.cache_teacher.gpus_per_node=2")  # 64 GiB of weights per GPU
    assert code == 1 and "cache-teacher does not fit" in out
    assert _plan(capsys, config, "slurm.cache_teacher.gpus_per_node=4")[0] == 0
    code, out = _plan(capsys, config, "slurm.cache_teacher.gpus_per_node=4", "slurm.gpu_memory_gb=40")
    assert code == 1 and "slurm.gpu_memory_gb=40" in out


def test_lora_targets_the_model_does_not_have_are_refused(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "minillm.yaml", "model.lora=true")  # GPT-SW3: Conv1D c_attn ...
    assert code == 1
    assert "model.lora_target_modules: none of the LoRA target modules" in out and "c_attn, c_fc, c_proj" in out
    code, out = _plan(capsys, ROOT / "configs" / "minillm.yaml", "model.lora=true",
                      "model.lora_target_modules=[c_attn,c_proj,c_fc]")
    assert code == 0, out


def test_full_fine_tuning_in_16_bits_says_master_weights_are_always_kept(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "minillm.yaml")
    assert code == 0 and "always keeps float32 master weights and moments" in out
    assert "weights, masters, gradients, Adam (1/4, FSDP)" in out


def test_the_plan_as_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", str(ROOT / "configs" / "grpo.yaml"), "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert [p["phase"] for p in plan["phases"]] == ["rollout", "cache-teacher", "update"]
    assert all(p["fits"] for p in plan["phases"]) and plan["problems"] == []


def _facts(name: str):
    config = json.loads((ROOT / "configs" / "models" / f"{name}.json").read_text())
    assert config["_source"].startswith("https://huggingface.co/")
    return arch_facts({k: v for k, v in config.items() if not k.startswith("_")})


def test_memory_model_matches_the_published_figures():
    """bf16 weights are 2 bytes a parameter; KV cache per token 2 x layers x KV heads x head_dim x 2 bytes:
    LLaMA-2-7B 512 KiB, Mistral-7B 128 KiB, LLaMA-2-70B 320 KiB (80 layers, 8 KV heads)."""
    llama7, mistral, llama70 = (_facts("meta-llama--Llama-2-7b-hf"), _facts("mistralai--Mistral-7B-v0.1"),
                                _facts("meta-llama--Llama-2-70b-chat-hf"))
    assert llama7.text_parameters == 6_738_415_616 and mistral.text_parameters == 7_241_732_096
    assert llama70.text_parameters == 68_976_648_192  # 80 layers of 8192 x (8192, 1024, 1024, 8192; 3 x 28672)
    assert weight_bytes(llama7, "bfloat16") == 2 * 6_738_415_616
    assert weight_bytes(llama70, "auto") == 2 * llama70.text_parameters  # "auto" is bf16 on a GPU
    assert weight_bytes(llama7, "float32") == 4 * 6_738_415_616
    assert [f.kv_bytes_per_token(2) for f in (llama7, mistral, llama70)] == [512 * 1024, 128 * 1024, 320 * 1024]
    assert 3.5 * GIB < weight_bytes(llama7, "bfloat16", four_bit=True) < 4.0 * GIB  # NF4 with 16-bit embeddings


def test_the_plan_of_the_flagship_config_counts_each_part(tmp_path):
    cfg = load_config(ROOT / "configs" / "grpo.yaml")
    report = make_plan(cfg, ROOT / "configs" / "grpo.yaml")
    rollout, teacher, update = report.phases
    assert [m.source.split()[0] for m in report.models] == ["shipped", "shipped"]
    gemma = report.models[1].facts
    assert teacher.gpus == 2 and teacher.available == int(0.85 * 80 * GIB)  # vLLM's share of each GPU
    assert teacher.parts["teacher weights (1/2)"] == weight_bytes(gemma, "auto") / 2
    assert teacher.parts["prompt log-prob logits (16384 tokens)"] == 16384 * 262208 * 4
    assert rollout.parts["student KV cache"] == 16 * 8 * (256 + 256) * 128 * 1024  # rows x tokens x KV per token
    assert "LoRA adapters, gradients, Adam" in update.parts and update.fits


def test_chain_submit_refuses_what_plan_refuses(tmp_path, capsys):
    config, too_few = ROOT / "configs" / "grpo_minillm_reward.yaml", "slurm.cache_teacher.gpus_per_node=1"
    code = main(["chain", "submit", "--config", str(config), f"output_dir={tmp_path}", too_few])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 1 and "grpo-kd plan refuses this run: cache-teacher does not fit" in err
    assert not (tmp_path / "grpo-minillm-reward").exists()  # refused before anything was written or submitted
    code = main(["chain", "submit", "--config", str(config), f"output_dir={tmp_path}", too_few, "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0 and "plan: cache-teacher does not fit" in " ".join(captured.err.split())
    assert "#!/bin/bash" in captured.out


def test_a_token_level_loss_with_another_vocabulary_is_refused(capsys):
    """The update cannot run it from an aligned cache: plan says so before the rollout and teacher pass run."""
    gemma = ["teacher.path=google/gemma-3-27b-it", "rollout.teacher_mix_alpha=0"]
    code, out = _plan(capsys, ROOT / "configs" / "minillm.yaml", *gemma)
    assert code == 1 and "loss.algorithm=minillm reads the teacher's next-token distribution" in out
    assert "262208 embedding rows against the student's 64000" in out


def test_a_full_fine_tune_that_does_not_fit_names_the_optimizer_state(capsys):
    code, out = _plan(capsys, ROOT / "configs" / "self_distill.yaml", "model.lora=false", "model.load_in_4bit=false")
    assert code == 1 and "update does not fit" in out and "largest part: weights, masters, gradients, Adam" in out


def test_second_models_are_counted_where_the_phases_load_them():
    """A live reference in the update only when nothing cached replaces it; a self-teacher mixed into sampling is
    a second copy of the student."""
    def phases(config: str, *overrides: str):
        return {m.phase: m for m in make_plan(load_config(ROOT / "configs" / config, list(overrides))).phases}

    assert "live reference model" not in phases("minillm.yaml")["update"].parts  # MiniLLM: no KL to a reference
    assert "live reference model" not in phases("minillm.yaml", "loss.policy.beta=0.04",
                                                "teacher.reference=true")["update"].parts  # cached
    live = phases("minillm.yaml", "loss.policy.beta=0.04")["update"].parts["live reference model"]
    assert live == 2 * 6_714_695_680  # GPT-SW3-6.7B-v2's initial weights in bf16
    assert "live reference model" not in phases("self_distill.yaml", "teacher.reference=false")["update"].parts
    rollout = phases("self_distill.yaml", "rollout.teacher_mix_alpha=0.1")["rollout"].parts
    assert rollout["mixing self-teacher weights"] == rollout["student weights"]  # the 4-bit base, twice


def test_data_is_read_where_it_is_here_and_described_where_it_is_not(tiny_models_quick, tmp_path, capsys):
    tiny = ROOT / "configs" / "tiny.yaml"
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("Í Føroyum er gott\n".encode() + b"og so \xff vit\n")
    code, out = _plan(capsys, tiny, *_tiny(tiny_models_quick), f"data.prompts={bad}")
    assert code == 1 and "prompts.txt:2: not UTF-8 text (byte 0xff at column 7)" in out  # as the rollout reads it
    code, out = _plan(capsys, tiny, *_tiny(tiny_models_quick), f"data.prompts={tmp_path / 'elsewhere.txt'}")
    assert code == 0 and "not on this machine, so not read: data.prompts=" in out
