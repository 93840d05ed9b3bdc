"""Model loading: local and hub errors, LoRA, adapters off, checkpoints, fingerprints, hidden states + head = logits."""

import hashlib
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from grpo_kd.config import ModelConfig, TeacherConfig, load_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import (
    adapters_disabled,
    final_hidden_states,
    position_ids_from_mask,
    lm_head,
    load_causal_lm,
    load_student,
    load_teacher,
    load_tokenizer,
    model_fingerprint,
    same_vocabulary,
    tokenizer_fingerprint,
)


def _ids(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask  # (B, T), (B, T)


def _logits_from_parts(model, input_ids, attention_mask=None):
    """The logits rebuilt from `final_hidden_states` and `lm_head`, exactly as the fused kernels see them."""
    hidden = final_hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    head = lm_head(model)
    logits = F.linear(hidden, head.weight, head.bias)  # (B, T, V)
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def _assert_one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------- loading


def test_load_causal_lm_local(tiny_models):
    model = load_causal_lm(str(tiny_models.teacher))
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert type(model).__name__ == "LlamaForCausalLM"
    half = load_causal_lm(str(tiny_models.student), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_load_tokenizer_has_pad(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models.tokenizer))
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "</s>"


@pytest.mark.parametrize(
    "path, phrase",
    [
        ("/nonexistent/model/dir", "not found"),
        ("runs/no-such-models/student", "not found"),  # a relative path that is missing, not a hub id
        ("someone/not-a-cached-model", "hub"),  # a valid hub id, but the hub is offline in the tests
    ],
)
def test_missing_model_is_one_line_error(path, phrase):
    with pytest.raises(GrpoKdError, match=phrase) as exc_info:
        load_causal_lm(path)
    _assert_one_line(exc_info)
    with pytest.raises(GrpoKdError):
        load_tokenizer(path)


def test_directory_without_model_files_is_error(tmp_path):
    with pytest.raises(GrpoKdError, match="config.json") as exc_info:
        load_causal_lm(str(tmp_path))
    _assert_one_line(exc_info)
    with pytest.raises(GrpoKdError, match="no tokenizer") as exc_info:
        load_tokenizer(str(tmp_path))
    _assert_one_line(exc_info)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GrpoKdError, match="holds no weights") as exc_info:
        load_causal_lm(str(tmp_path))
    _assert_one_line(exc_info)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(GrpoKdError, match="could not load model") as exc_info:
        load_causal_lm(str(tmp_path))
    _assert_one_line(exc_info)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_4bit_without_bitsandbytes_is_clear_error(tiny_models, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(GrpoKdError, match=r"pip install 'grpo-kd\[quant\]'") as exc_info:
        load_causal_lm(str(tiny_models.teacher), load_in_4bit=True)
    _assert_one_line(exc_info)


def test_4bit_student_needs_lora(tiny_models):
    """A rule of the config (grpo_kd/config/rules.py), so every command refuses it before loading anything."""
    with pytest.raises(GrpoKdError, match="set model.lora=true") as exc_info:
        load_config(None, [f"model.path={tiny_models.student}", "model.load_in_4bit=true"])
    _assert_one_line(exc_info)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_4bit_on_the_cpu(tiny_models, tiny_family):
    """bitsandbytes' CPU backend: NF4 linear layers, the LM head kept in float32, logits near the float model's;
    widths its CPU kernels cannot pack (the tiny Llama's 96) are refused in one line before loading."""
    with pytest.raises(GrpoKdError, match="multiples of 64") as exc_info:
        load_causal_lm(str(tiny_models.teacher), load_in_4bit=True)
    _assert_one_line(exc_info)
    path = str(tiny_family("mistral").teacher)
    model, full = load_causal_lm(path, load_in_4bit=True), load_causal_lm(path)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.lm_head.weight.dtype == torch.float32 and torch.equal(model.lm_head.weight, full.lm_head.weight)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        q, f = model(ids).logits.log_softmax(-1), full(ids).logits.log_softmax(-1)
    assert 0 < (q - f).abs().max() < 1.0  # quantised, and close


# ---------------------------------------------------------------------------------------------- student, LoRA


def test_load_student_full_and_frozen(tiny_models):
    cfg = ModelConfig(path=str(tiny_models.student))
    model = load_student(cfg)
    assert model.training and all(p.requires_grad for p in model.parameters())
    frozen = load_student(cfg, trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_load_student_lora_uses_present_targets(tiny_models):
    cfg = ModelConfig(path=str(tiny_models.student), lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj", "c_attn"])
    model = load_student(cfg)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj.lora_A" in name for name in trainable) and not any("k_proj" in name for name in trainable)


def test_lora_without_matching_targets_names_the_modules(tiny_models):
    cfg = ModelConfig(path=str(tiny_models.student), lora=True, lora_target_modules=["c_attn", "c_proj"])
    with pytest.raises(GrpoKdError, match="q_proj") as exc_info:
        load_student(cfg)
    _assert_one_line(exc_info)


def _perturb_adapters(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_adapters_disabled_gives_base_outputs(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models.student))
    input_ids, mask = _ids(tokenizer, ["Hvat er 3 og 4?", "Eftir mánadag kemur"])
    base = load_causal_lm(str(tiny_models.student))
    model = load_student(ModelConfig(path=str(tiny_models.student), lora=True, lora_r=4))
    _perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        base_logits = base(input_ids, attention_mask=mask).logits
        adapted = model(input_ids, attention_mask=mask).logits
        with adapters_disabled(model):
            disabled = model(input_ids, attention_mask=mask).logits
            disabled_hidden = final_hidden_states(model, input_ids, mask)
        again = model(input_ids, attention_mask=mask).logits
    assert (adapted - base_logits).abs().max() > 1e-2  # the perturbed adapters change the output
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(disabled_hidden, final_hidden_states(base, input_ids, mask).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(again, adapted)  # adapters back on afterwards


def test_adapters_disabled_is_noop_without_adapters(tiny_models):
    model = load_causal_lm(str(tiny_models.student))
    with adapters_disabled(model) as inside:
        assert inside is model


def test_adapter_checkpoint_roundtrip(tiny_models, tmp_path):
    cfg = ModelConfig(path=str(tiny_models.student), lora=True, lora_r=4)
    model = load_student(cfg)
    _perturb_adapters(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_student(cfg, checkpoint=str(tmp_path / "ckpt"), trainable=False)
    input_ids = torch.tensor([[1, 40, 41, 42, 43]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    resumed = load_student(cfg, checkpoint=str(tmp_path / "ckpt"), trainable=True)
    assert any(p.requires_grad for p in resumed.parameters())


def test_full_weight_checkpoint_and_missing_checkpoint(tiny_models, tmp_path):
    cfg = ModelConfig(path=str(tiny_models.student))
    model = load_student(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "full")
    loaded = load_student(cfg, checkpoint=str(tmp_path / "full"))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(GrpoKdError, match="not found"):
        load_student(cfg, checkpoint=str(tmp_path / "missing"))
    with pytest.raises(GrpoKdError, match="neither"):
        load_student(cfg, checkpoint=str(tmp_path))


def test_load_teacher_kinds(tiny_models):
    student_cfg = ModelConfig(path=str(tiny_models.student))
    teacher = load_teacher(TeacherConfig(path=str(tiny_models.teacher)), student_cfg)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert model_fingerprint(teacher)["name"] == str(tiny_models.teacher)
    for kind in ("self_base", "self_privileged"):
        self_teacher = load_teacher(TeacherConfig(kind=kind), student_cfg)
        assert model_fingerprint(self_teacher) == model_fingerprint(load_causal_lm(str(tiny_models.student)))
        assert not any(p.requires_grad for p in self_teacher.parameters())


# ---------------------------------------------------------------------------------------------- fingerprints

def _vocab_hash_from_file(directory):
    """The vocabulary hash recomputed from tokenizer.json alone: proves it depends on nothing of the process."""
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"]) | {t["content"]: t["id"] for t in data["added_tokens"]}
    pairs = sorted((i, tok) for tok, i in vocab.items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def test_tokenizer_fingerprint_stable_and_distinct(tiny_models, tiny_student_other_vocab):
    a = tokenizer_fingerprint(load_tokenizer(str(tiny_models.teacher)))
    b = tokenizer_fingerprint(load_tokenizer(str(tiny_models.student)))
    other = tokenizer_fingerprint(load_tokenizer(str(tiny_student_other_vocab)))
    assert set(a) == {"vocab_size", "vocab_hash", "name"} and len(a["vocab_hash"]) == 64
    assert a["vocab_size"] == 1024 and other["vocab_size"] == 512
    assert same_vocabulary(a, b) and a["vocab_hash"] == b["vocab_hash"]
    assert not same_vocabulary(a, other)
    assert a["vocab_hash"] == _vocab_hash_from_file(tiny_models.teacher)  # stable across processes


def test_model_fingerprint(tiny_models):
    teacher = model_fingerprint(load_causal_lm(str(tiny_models.teacher)))
    again = model_fingerprint(load_causal_lm(str(tiny_models.teacher), dtype="bfloat16"))
    student = model_fingerprint(load_causal_lm(str(tiny_models.student)))
    assert set(teacher) == {"name", "architecture", "num_parameters", "config_hash"}
    assert teacher == again  # the dtype is recorded separately in the manifests
    assert teacher["architecture"] == "LlamaForCausalLM"
    assert teacher["config_hash"] != student["config_hash"]
    assert teacher["num_parameters"] > student["num_parameters"]


# ---------------------------------------------------------------------------------------------- hidden + head


@pytest.mark.parametrize("role", ["teacher", "student"])  # untied and tied embeddings
def test_hidden_and_head_reproduce_logits_llama(tiny_models, role):
    path = str(getattr(tiny_models, role))
    model = load_causal_lm(path)
    input_ids, mask = _ids(load_tokenizer(path), ["Hvat er 3 og 4? Tað er sjey.", "Ð Ø Á"])
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        torch.testing.assert_close(_logits_from_parts(model, input_ids, mask), expected, rtol=0, atol=0)
    assert lm_head(model).softcap is None and lm_head(model).bias is None


def test_hidden_states_do_not_depend_on_padding(tiny_models):
    model = load_causal_lm(str(tiny_models.teacher))
    tokenizer = load_tokenizer(str(tiny_models.teacher))
    ids = tokenizer("Eftir týsdag kemur mikudagur.", return_tensors="pt").input_ids  # (1, T)
    pad = torch.full((1, 4), tokenizer.pad_token_id)
    ones, zeros = torch.ones_like(ids), torch.zeros_like(pad)
    with torch.no_grad():
        alone = final_hidden_states(model, ids)
        left = final_hidden_states(model, torch.cat([pad, ids], 1), torch.cat([zeros, ones], 1))[:, 4:]
        right = final_hidden_states(model, torch.cat([ids, pad], 1), torch.cat([ones, zeros], 1))[:, : ids.shape[1]]
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)


def test_hidden_and_head_peft_model_is_differentiable(tiny_models):
    model = load_student(ModelConfig(path=str(tiny_models.student), lora=True, lora_r=4))
    _perturb_adapters(model)
    model.eval()
    input_ids = torch.tensor([[1, 300, 301, 302, 303, 304]])
    torch.testing.assert_close(_logits_from_parts(model, input_ids), model(input_ids).logits, rtol=0, atol=0)
    with adapters_disabled(model):
        torch.testing.assert_close(_logits_from_parts(model, input_ids), model(input_ids).logits, rtol=0, atol=0)
    _logits_from_parts(model, input_ids).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _gemma_models():
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0, max_position_embeddings=64)
    out = []
    if hasattr(transformers, "Gemma2ForCausalLM"):
        out.append(("gemma2", transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**common)))
    if hasattr(transformers, "Gemma3ForCausalLM"):
        out.append(("gemma3", transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**common)))
    return out


@pytest.mark.parametrize("name, model_cls, config", _gemma_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_hidden_and_head_reproduce_logits_softcap(name, model_cls, config):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # large logits, so that the softcap is active
    input_ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding
    assert lm_head(model).softcap == 5.0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        assert expected.abs().max() > 2.5  # the cap really bends the logits
        torch.testing.assert_close(_logits_from_parts(model, input_ids, mask), expected, rtol=0, atol=1e-6)


def test_gradient_checkpointing_with_lora_trains(tiny_models):
    cfg = ModelConfig(path=str(tiny_models.student), lora=True, lora_r=4, gradient_checkpointing=True)
    model = load_student(cfg)
    input_ids = torch.tensor([[1, 300, 301, 302, 303, 304]])
    final_hidden_states(model, input_ids, torch.ones_like(input_ids)).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_training_checkpoint_loads_as_a_student_and_locates_its_run(tiny_models_quick, tmp_path):
    """checkpoints/iter_NNNN keeps its weights in model/: the loader and the evaluator both accept either path."""
    import torch

    from grpo_kd.config import ModelConfig
    from grpo_kd.evaluate.suite import locate_run
    from grpo_kd.models import load_student
    from grpo_kd.train.checkpoint import save_checkpoint

    cfg = ModelConfig(path=str(tiny_models_quick.student))
    model = load_student(cfg, trainable=False)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # a "trained" student differs from the base
    final = tmp_path / "run" / "checkpoints" / "iter_0003"
    save_checkpoint(final, model=model, state={"step": 1})
    for path in (final, final / "model"):
        loaded = load_student(cfg, checkpoint=str(path), trainable=False)
        assert torch.equal(next(loaded.parameters()), next(model.parameters()))
        assert locate_run(path) == ((tmp_path / "run").resolve(), 3)
