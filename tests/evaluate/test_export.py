"""`grpo-kd export`: the export loads with plain transformers (no grpo_kd code) and gives the same log-probs as the
checkpoint loaded through grpo_kd, for a LoRA adapter (merged) and full weights; `evaluate --suite euroeval` hands
EuroEval an export when given an adapter."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from grpo_kd.cli.app import main
from grpo_kd.config import load_config
from grpo_kd.evaluate.export import is_standalone
from grpo_kd.evaluate.loading import load_checkpoint
from grpo_kd.evaluate.suite import evaluate_checkpoint
from grpo_kd.models import load_student
from grpo_kd.train.checkpoint import save_checkpoint

TEXT = ["Hvussu gongur tað í dag?", "Eg fari heim"]

# Log-probs of TEXT under the model in OUT, by transformers alone: the test's view of what EuroEval or vLLM load.
PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
enc = tokenizer(json.loads(sys.argv[2]), return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**enc).logits.float()
logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0] * enc.attention_mask[:, 1:]
chat = tokenizer.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False)
ours = sorted(m for m in sys.modules if m.startswith(("grpo_kd", "peft")))
print(json.dumps({"logprobs": logprobs.tolist(), "chat": chat, "modules": ours}))
"""


def plain_transformers(out) -> dict:
    done = subprocess.run([sys.executable, "-c", PLAIN, str(out), json.dumps(TEXT)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def grpo_kd_logprobs(checkpoint, cfg, tokenizer) -> torch.Tensor:
    model = load_checkpoint(str(checkpoint), cfg)
    enc = tokenizer(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits.float()  # (B, T, V)
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0] * enc.attention_mask[:, 1:]


@pytest.fixture(scope="module")
def checkpoints(tiny_models_quick, tmp_path_factory):
    """A LoRA checkpoint whose adapter is not zero (B = 0 at init would make a missing merge invisible) and a
    full-weight checkpoint, both as the update writes them (RUN/checkpoints/iter_NNNN/model)."""
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, [f"model.path={tiny_models_quick.student}", "model.lora=true", "model.lora_r=4"])
    torch.manual_seed(0)
    lora = load_student(cfg.model, trainable=True)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    full = load_student(load_config(None, [f"model.path={tiny_models_quick.student}"]).model, trainable=True)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    paths = {}
    for kind, model in (("lora", lora), ("full", full)):
        paths[kind] = save_checkpoint(root / kind / "checkpoints" / "iter_0001", model=model, state={"step": 1})
    return cfg, paths


@pytest.mark.slow  # two exports and two fresh interpreters importing transformers
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_export_loads_with_plain_transformers_and_matches(checkpoints, tiny_models_quick, tmp_path, kind):
    from grpo_kd.models import load_tokenizer

    cfg, paths = checkpoints
    out = tmp_path / "export"
    assert main(["export", str(paths[kind]), str(out), f"model.path={tiny_models_quick.student}",
                 f"model.lora={str(kind == 'lora').lower()}"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "export.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin", "optimizer.safetensors"}
    assert is_standalone(out) and not is_standalone(paths[kind])
    plain = plain_transformers(out)
    assert plain["modules"] == []  # transformers alone loaded it
    tokenizer = load_tokenizer(str(tiny_models_quick.student))
    expected = grpo_kd_logprobs(paths[kind], cfg, tokenizer)
    assert torch.tensor(plain["logprobs"]) == pytest.approx(expected, abs=2e-5)
    base = grpo_kd_logprobs(tiny_models_quick.student, load_config(None, [f"model.path={tiny_models_quick.student}"]), tokenizer)
    assert (expected - base).abs().max() > 1e-3  # the checkpoint differs from its base: a lost merge would show
    assert plain["chat"] == tokenizer.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False)
    assert json.loads((out / "export.json").read_text())["merged_adapter"] is (kind == "lora")


@pytest.mark.slow  # an export on the way
def test_euroeval_gets_an_export_of_an_adapter(checkpoints, tmp_path, monkeypatch):
    cfg, paths = checkpoints
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "euroeval"  # records the model it was given; answers as EuroEval does
    fake.write_text("#!/bin/sh\necho \"$2\" > model.txt\n"
                    "printf '{\"dataset\": \"foqa\", \"model\": \"%s\", \"results\": {\"total\": {\"test_f1\": 1.5}}}\\n' "
                    "\"$2\" > euroeval_benchmark_results.jsonl\n", encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = evaluate_checkpoint(paths["lora"], suites=["euroeval"], cfg=cfg, euroeval_dir=tmp_path / "work")
    given = (tmp_path / "work" / "model.txt").read_text().strip()
    assert given == str((tmp_path / "work" / "model").resolve()) and is_standalone(given)
    assert result["euroeval"]["datasets"]["foqa"]["test_f1"] == 1.5


def test_export_of_a_missing_or_foreign_directory_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out"), "--dtype", "float32"]) == 1
    assert "holds neither config.json nor adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
