"""Architecture facts from config.json alone: exact parameter counts and KV-cache sizes on every tiny family
(counted on the built models), and the published counts of LLaMA-2-7B and Mistral-7B from their config fields."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo_kd.arch import arch_facts
from grpo_kd.errors import GrpoKdError
from grpo_kd.tiny_families import FAMILIES

VISION = ("vision_tower", "multi_modal_projector")


@pytest.mark.parametrize("arch", FAMILIES)
def test_facts_match_the_built_models(arch, tiny_family):
    models = tiny_family(arch)
    for path in (models.teacher, models.student):
        facts = arch_facts(json.loads((path / "config.json").read_text()))
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        total = sum(p.numel() for p in model.parameters())  # a tied head counts once
        vision = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[1] in VISION) \
            if arch == "gemma3" else 0
        assert (facts.text_parameters, facts.vision_parameters) == (total - vision, vision)
        assert facts.vocab_size == model.get_output_embeddings().weight.shape[0]
        tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert facts.tied_embeddings == tied
        tokens = 16  # within every sliding window: every layer keeps every token
        with torch.no_grad():
            cache = model(input_ids=torch.randint(5, 200, (1, tokens)), use_cache=True).past_key_values
        stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert stored == facts.kv_bytes_per_token(4, context=tokens) * tokens


def test_published_counts():
    """config.json fields of the checkpoints: LLaMA-2-7B 6,738,415,616 parameters and 512 KiB of bf16 KV cache per
    token; Mistral-7B 7,241,732,096 parameters and 128 KiB (grouped-query attention: 8 KV heads)."""
    llama2 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
              "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
              "max_position_embeddings": 4096}
    mistral = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
               "max_position_embeddings": 32768, "sliding_window": 4096}
    a, b = arch_facts(llama2), arch_facts(mistral)
    assert (a.text_parameters, a.kv_bytes_per_token(2)) == (6_738_415_616, 512 * 1024)
    assert (b.text_parameters, b.kv_bytes_per_token(2)) == (7_241_732_096, 128 * 1024)
    assert b.kv_bytes_per_token(2, context=8192) == 64 * 1024  # every layer keeps 4,096 of the 8,192 tokens


def test_unknown_model_type():
    with pytest.raises(GrpoKdError, match="no architecture reader for model_type 'bert'"):
        arch_facts({"model_type": "bert"})
