"""The model families in miniature (`grpo-kd tiny-models --arch`): each is the class the real checkpoint loads as,
with its tokenizer type, special tokens, chat format and LM-head layout; and grpo-kd's own paths (the decoder
without its head, the LM-head parts, LoRA targets, the sampler) agree with transformers' forward on each."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_kd.config import ModelConfig
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import (
    adapters_disabled,
    final_hidden_states,
    lm_head,
    load_causal_lm,
    load_student,
    load_tokenizer,
    position_ids_from_mask,
)
from grpo_kd.tiny_families import FAMILIES, family

FAROESE = "Ð Ø Á Í Ó Ú Ý Æ ð ø á í ó ú ý æ: Fiskimaðurin sær ein bát við sjóvarmálan í Tórshavn. 日本 😀"
QUESTION = [{"role": "user", "content": "Hvat er 2 og 2?"}]
# Each family's rendering of one user turn with the generation prompt, and whether its tokenizer adds a BOS.
CHAT = {
    "llama": ("<|user|>\nHvat er 2 og 2?</s>\n<|assistant|>\n", True),
    "mistral": ("<s>[INST] Hvat er 2 og 2? [/INST]", True),
    "gemma3": ("<bos><start_of_turn>user\nHvat er 2 og 2?<end_of_turn>\n<start_of_turn>model\n", True),
    "gpt2": ("<|endoftext|><s>\nUser:\nHvat er 2 og 2?\n<s>\nBot:\n", False),
}
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}  # GPT-2's Conv1D layers; the others: the config default


def _text_config(model):
    return model.config.get_text_config()


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_is_the_real_structure(arch, tiny_family):
    fam, models = family(arch), tiny_family(arch)
    tokenizer = AutoTokenizer.from_pretrained(str(models.tokenizer))
    saved = json.loads((models.teacher / "tokenizer_config.json").read_text())
    assert type(tokenizer).__name__ == saved["tokenizer_class"] == fam.tokenizer_class
    assert tokenizer.convert_ids_to_tokens(list(range(len(fam.specials)))) == list(fam.specials)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (fam.bos, fam.eos, fam.pad)
    assert load_tokenizer(str(models.tokenizer)).pad_token == (fam.pad or fam.eos)  # no pad token: pads with eos
    rendered, adds_bos = CHAT[arch]
    assert tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == rendered
    ids = tokenizer(FAROESE).input_ids
    assert (ids[0] == tokenizer.bos_token_id) == adds_bos
    assert tokenizer.decode(ids, skip_special_tokens=True) == FAROESE
    for role, shape in (("teacher", fam.teacher_arch), ("student", fam.student_arch)):
        model = AutoModelForCausalLM.from_pretrained(str(getattr(models, role)))
        assert type(model).__name__ == model.config.architectures[0] == fam.model_class
        tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert tied == shape.tie_embeddings
        text = _text_config(model)
        assert getattr(text, "final_logit_softcapping", None) is None  # none of these families caps its logits
        rows = model.get_output_embeddings().weight.shape[0]
        if arch == "gemma3":  # rows padded to a multiple of 64, beyond the tokenizer (262,208 vs 262,145 for real)
            assert rows % 64 == 0 and rows > len(tokenizer) and tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) \
                == "<image_soft_token>"
            assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
            assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
        else:
            assert rows == len(tokenizer)
        if arch != "llama":  # a head size vLLM's CPU attention supports
            assert getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads == 64


def _gemma3_text_only(models, cap: float):
    """The teacher's text decoder as Gemma3ForCausalLM (the class of the text-only Gemma-3 checkpoints, which
    applies `final_logit_softcapping`) with a soft cap of `cap`."""
    from transformers import Gemma3ForCausalLM

    multimodal = AutoModelForCausalLM.from_pretrained(str(models.teacher))
    text = multimodal.config.text_config
    text.final_logit_softcapping = cap
    model = Gemma3ForCausalLM(text)
    model.model.load_state_dict(multimodal.model.language_model.state_dict())
    return model.eval()


@pytest.mark.parametrize("arch", FAMILIES)
def test_decoder_and_head_give_transformers_logits(arch, tiny_family):
    """final_hidden_states + lm_head (what every phase uses) == the model's own forward, on left-padded rows, over
    the tokenizer's ids. Gemma-3 twice more: the multimodal class ignores its text config's soft cap, and the
    text-only class applies it."""
    models = tiny_family(arch)
    tokenizer = load_tokenizer(str(models.teacher))
    model = load_causal_lm(str(models.teacher), vocab_size=len(tokenizer)).eval()
    encoded = [tokenizer(text).input_ids for text in ("Í Føroyum eru", "The old man said that the sea")]
    width = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])  # (2, T) left-padded
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])  # (2, T)
    variants = [(model, None)]
    if arch == "gemma3":
        capped = AutoModelForCausalLM.from_pretrained(str(models.teacher)).eval()
        capped.config.text_config.final_logit_softcapping = 3.0  # not applied by Gemma3ForConditionalGeneration
        text_only = _gemma3_text_only(models, 3.0)
        variants += [(capped, None), (text_only, 3.0)]
    for model, cap in variants:
        head = lm_head(model)
        assert head.softcap == cap
        with torch.no_grad():
            logits = (final_hidden_states(model, ids, mask) @ head.weight.T).float()  # (2, T, V)
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            expected = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        real = mask.bool()
        V = head.weight.shape[0]
        torch.testing.assert_close(logits[real], expected[..., :V][real].float(), atol=1e-4, rtol=1e-4)
    assert lm_head(variants[0][0]).weight.shape[0] == len(tokenizer)


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_on_the_text_decoder(arch, tiny_family):
    """LoRA attaches to the decoder's projections only (Conv1D on GPT-2, not Gemma-3's vision tower); the adapted
    forward differs once B is non-zero and `adapters_disabled` gives the base again."""
    models = tiny_family(arch)
    cfg = ModelConfig(path=str(models.student), lora=True, lora_r=4, **(
        {"lora_target_modules": LORA_TARGETS[arch]} if arch in LORA_TARGETS else {}))
    student = load_student(cfg, trainable=True)
    adapted = [name for name, _ in student.named_modules() if name.endswith("lora_A")]
    assert adapted and not any("vision" in name for name in adapted)
    if arch == "gpt2":
        assert {type(m.base_layer).__name__ for n, m in student.named_modules() if n.endswith(("c_attn", "c_fc"))} \
            == {"Conv1D"}
    ids = torch.tensor([[5, 60, 70, 80]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = final_hidden_states(student, ids, mask)
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
        changed = final_hidden_states(student, ids, mask)
        with adapters_disabled(student):
            again = final_hidden_states(student, ids, mask)
    assert not torch.allclose(base, changed) and torch.equal(base, again)


def test_lora_targets_the_model_lacks(tiny_family):
    with pytest.raises(GrpoKdError, match="c_attn, c_fc, c_proj"):
        load_student(ModelConfig(path=str(tiny_family("gpt2").student), lora=True), trainable=True)


def test_sampling_never_draws_padding_rows(tiny_family):
    """Gemma-3's padding rows made the most likely "tokens": transformers' full head would draw them; the loaded
    model's head (cut to the tokenizer) never does, nor does the sampler."""
    from grpo_kd.train.sampling import SamplingParams, _Stepper, left_pad, sample_batch

    models = tiny_family("gemma3")
    tokenizer = load_tokenizer(str(models.student))
    model = load_causal_lm(str(models.student), vocab_size=len(tokenizer)).eval()
    prompts = [tokenizer(t).input_ids for t in ("Í Føroyum eru", "Hann gekk niður til", "Once upon a time")]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, mask)[:, -1]  # (R, H)
        model.get_output_embeddings().weight[len(tokenizer):] = 50 * hidden.mean(0) / hidden.mean(0).norm()
        full = hidden @ model.get_output_embeddings().weight.T  # (R, rows) what the checkpoint's head gives
    assert bool((full.argmax(-1) >= len(tokenizer)).all())  # the padding rows would win
    assert _Stepper(model, ids, mask).logits.shape[-1] == len(tokenizer)
    samples = sample_batch(model, prompts * 4, list(range(12)), SamplingParams(max_new_tokens=6), eos_ids={1},
                           pad_id=tokenizer.pad_token_id)
    assert max(max(s.completion_ids) for s in samples) < len(tokenizer)


def test_unknown_family_is_one_line(tmp_path, capsys):
    from grpo_kd.cli.app import main

    assert main(["tiny-models", str(tmp_path / "x"), "--arch", "falcon"]) == 1
    assert "unknown architecture family 'falcon'; expected one of llama, mistral, gemma3, gpt2" in capsys.readouterr().err
