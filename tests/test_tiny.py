"""Tiny models: built from the built-in corpus and from Faroese text, loadable like any checkpoint, deterministic."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_kd.config import ModelConfig
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import load_causal_lm, load_student, load_tokenizer, tokenizer_fingerprint
from grpo_kd.tiny import BUILTIN_CORPUS, build_tiny_models, corpus_texts

FAROESE = "Ð Ø Á Í Ó Ú Ý Æ ð ø á í ó ú ý æ: Fiskimaðurin sær ein bát við sjóvarmálan í Tórshavn."


def test_builtin_corpus_matches_its_generator():
    generator = runpy.run_path(str(BUILTIN_CORPUS.parent / "generate_corpus.py"))
    assert BUILTIN_CORPUS.read_text(encoding="utf-8") == "\n".join(generator["generate_lines"]()) + "\n"
    text = BUILTIN_CORPUS.read_text(encoding="utf-8")
    assert len(text.encode()) < 300_000
    assert all(ch in text for ch in "ðøáíóúýæÐØÁÍÓÚÝÆ")


def test_tiny_pair_from_builtin_corpus(tiny_models):
    report = json.loads((tiny_models.teacher.parent / "build.json").read_text())
    teacher, student = report["teacher"], report["student"]
    assert teacher["parameters"] > student["parameters"]
    assert teacher["heldout_perplexity"] < 0.8 * student["heldout_perplexity"]  # the teacher is clearly better
    for path in tiny_models:
        assert (path / "tokenizer.json").is_file()


def test_tiny_dirs_load_through_auto_classes(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.student)
    assert model.config.vocab_size == len(tokenizer) == 1024
    assert tokenizer.decode(tokenizer(FAROESE).input_ids, skip_special_tokens=True) == FAROESE


def test_tokenizer_specials_and_chat_template(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models.tokenizer))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tokenizer("Góðan dag").input_ids[0] == tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hvat er 2 og 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>\nHvat er 2 og 2?</s>\n<|assistant|>\n"
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") != tokenizer.unk_token_id


def test_tiny_pair_from_faroese_text(faroese_dir, tmp_path_factory):
    corpus = sorted(faroese_dir.glob("*.conllu"))
    out = tmp_path_factory.mktemp("faroese-tiny")
    paths = build_tiny_models(out, corpus, pretrain_steps=8, student_pretrain_steps=2)
    tokenizer = load_tokenizer(str(paths.tokenizer))
    for sentence in corpus_texts(corpus):
        assert tokenizer.decode(tokenizer(sentence).input_ids, skip_special_tokens=True) == sentence
    input_ids = tokenizer(["Føroyar eru ikki limur í ES, hóast Danmark er."], return_tensors="pt").input_ids
    teacher = load_causal_lm(str(paths.teacher))
    for lora in (False, True):
        student = load_student(ModelConfig(path=str(paths.student), lora=lora, lora_r=4), trainable=False)
        with torch.no_grad():
            assert student(input_ids).logits.shape[-1] == teacher(input_ids).logits.shape[-1] == len(tokenizer)
    assert "farpahc-train.conllu" in json.loads((out / "build.json").read_text())["params"]["corpus"][1]


def test_builtin_pair_loads_with_and_without_lora(tiny_models):
    for lora in (False, True):
        student = load_student(ModelConfig(path=str(tiny_models.student), lora=lora, lora_r=4))
        assert hasattr(student, "peft_config") == lora


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_build_is_deterministic_and_reused(tmp_path):
    a = build_tiny_models(tmp_path / "a", pretrain_steps=3, student_pretrain_steps=1, seed=7)
    b = build_tiny_models(tmp_path / "b", pretrain_steps=3, student_pretrain_steps=1, seed=7)
    assert (a.tokenizer / "tokenizer.json").read_bytes() == (b.tokenizer / "tokenizer.json").read_bytes()
    for role in ("teacher", "student"):
        wa, wb = _weights(getattr(a, role)), _weights(getattr(b, role))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    stamp = (a.teacher / "model.safetensors").stat().st_mtime_ns
    build_tiny_models(tmp_path / "a", pretrain_steps=3, student_pretrain_steps=1, seed=7)  # same settings: reused
    assert (a.teacher / "model.safetensors").stat().st_mtime_ns == stamp
    c = build_tiny_models(tmp_path / "c", pretrain_steps=3, student_pretrain_steps=1, seed=8)
    assert not torch.equal(_weights(a.teacher)["lm_head.weight"], _weights(c.teacher)["lm_head.weight"])


def test_other_vocab_student(tiny_models, tiny_student_other_vocab):
    other = load_tokenizer(str(tiny_student_other_vocab))
    assert len(other) == 512 and load_causal_lm(str(tiny_student_other_vocab)).config.vocab_size == 512
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(load_tokenizer(str(tiny_models.student)))


def test_bad_inputs(tmp_path):
    with pytest.raises(GrpoKdError, match="too small"):
        build_tiny_models(tmp_path / "x", vocab_size=100, pretrain_steps=0)
    with pytest.raises(GrpoKdError, match="not found"):
        build_tiny_models(tmp_path / "y", [tmp_path / "missing.txt"], pretrain_steps=0)


def test_cli_tiny_models(tmp_path, capsys):
    from grpo_kd.cli.app import main

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Línja {i}: ein lítil tekstur um Føroyar og havið." for i in range(400)), encoding="utf-8")
    assert main(["tiny-models", str(tmp_path / "out"), "--corpus", str(text), "--pretrain-steps", "0", "--vocab-size", "300"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert (tmp_path / "out" / "student" / "config.json").is_file()
    assert main(["tiny-models", str(tmp_path / "out2"), "--corpus", str(tmp_path / "nope.txt")]) == 1
    assert "corpus file not found" in capsys.readouterr().err


def test_corpus_texts_reads_each_format_by_its_suffix(tmp_path):
    lines = tmp_path / "corpus.txt"
    lines.write_text("Fyrsta línja.\n\nOnnur línja.\n", encoding="utf-8")
    records = tmp_path / "corpus.jsonl"
    records.write_text(json.dumps({"text": "STÓRIR STAVIR.\n\nOg so vanligir."}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert corpus_texts([lines, records]) == ["Fyrsta línja.", "Onnur línja.", "STÓRIR STAVIR.\n\nOg so vanligir."]
