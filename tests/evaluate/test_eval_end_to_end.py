"""`grpo-kd evaluate` and `grpo-kd report` on tiny models, through the real command line, plus the invariants
that pin the numbers down: perplexity == the model's own cross-entropy, exact KL == KL from full logits."""

import json
import math
import shutil

import pytest
import torch

from grpo_kd.cli.app import main
from grpo_kd.config import load_config
from grpo_kd.evaluate import suite as suite_module
from grpo_kd.evaluate.perplexity import perplexity, windows

FAST = ["eval.max_new_tokens=10", "eval.prompt_words=3", "eval.foqa_shots=1", "eval.batch_size=4"]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_evaluate_every_local_suite(tiny_models, foqa_file, heldout_file, tmp_path, capsys):
    out = tmp_path / "reports"
    code = main([
        "evaluate", "--checkpoint", str(tiny_models.student), "--teacher", str(tiny_models.teacher),
        "--suite", "foqa,perplexity,distill,diversity", "--foqa", str(foqa_file), "--text", str(heldout_file),
        "--out", str(out), f"eval.heldout_text={heldout_file}", *FAST,
    ])
    assert code == 0
    result = json.loads((out / "eval_student.json").read_text(encoding="utf-8"))
    assert result["suites"] == ["foqa", "perplexity", "distill", "diversity"]
    foqa = result["foqa"]
    assert foqa["count"] == 5 and foqa["shots"] == 1 and 0 <= foqa["em"] <= foqa["f1"] <= 1
    assert all("\n" not in e["prediction"] for e in foqa["examples"])
    ppl = result["perplexity"]
    assert ppl["num_bytes"] == sum(len(line.encode()) for line in heldout_file.read_text(encoding="utf-8").splitlines())
    assert ppl["perplexity"] > 1 and ppl["bits_per_byte"] == pytest.approx(ppl["nll_per_byte"] / math.log(2))
    distill = result["distill"]
    assert distill["num_samples"] == 4 and distill["forward_kl"] >= 0 and distill["reverse_kl"] >= 0
    assert 0 <= distill["top1_agreement"] <= 1 and distill["teacher_logprob_mean"] < 0
    diversity = result["diversity"]
    assert diversity["num_texts"] == 4 and all(0 <= diversity[f"distinct_{n}"] <= 1 for n in (1, 2, 3))
    assert (out / "eval_student.png").read_bytes()[:4] == b"\x89PNG"
    assert "| foqa/f1 |" in (out / "eval_student.md").read_text(encoding="utf-8")


def test_perplexity_is_the_models_own_cross_entropy(tiny_models):
    from grpo_kd.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_models.student), device="cpu"), load_tokenizer(str(tiny_models.student))
    text = "Seyðurin gekk á bønum, og bóndin fór niður til sjóvar."
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        expected = float(model(ids, labels=ids).loss)  # mean CE over the text's tokens, given <s>
    assert perplexity(model, tok, [text])["nll_per_token"] == pytest.approx(expected, rel=1e-4)
    # windows of 5 tokens score the same tokens as one long window
    small = perplexity(model, tok, [text], max_tokens=5)
    assert small["num_tokens"] == ids.shape[1] - 1 and small["window_tokens"] == 5


def test_windows_predict_every_token_once():
    seq = list(range(11))
    parts = windows(seq, 4)
    assert parts == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10]]
    assert sum(len(p) - 1 for p in parts) == len(seq) - 1


def test_exact_kl_matches_full_logits(tiny_models):
    from grpo_kd.evaluate.distill import distill_metrics, student_side
    from grpo_kd.evaluate.generation import generate
    from grpo_kd.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_models.student))
    student, teacher = (load_causal_lm(str(p), device="cpu") for p in (tiny_models.student, tiny_models.teacher))
    prompts = ["Tórshavn er", "Í Føroyum eru"]
    samples = generate(student, tok, prompts, max_new_tokens=6, do_sample=True, seed=3)
    got = distill_metrics(student_side(student, tok, samples, prompts, 2), teacher, pad_id=tok.pad_token_id)
    forward, reverse, agree = [], [], []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        span = slice(len(s.prompt_ids) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            log_q = torch.log_softmax(student(ids).logits[0, span].double(), -1)  # (C, V)
            log_p = torch.log_softmax(teacher(ids).logits[0, span].double(), -1)  # (C, V)
        forward += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
        reverse += (log_q.exp() * (log_q - log_p)).sum(-1).tolist()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).double().tolist()
    assert got["forward_kl"] == pytest.approx(sum(forward) / len(forward), rel=1e-4)
    assert got["reverse_kl"] == pytest.approx(sum(reverse) / len(reverse), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(sum(agree) / len(agree))


def test_distill_refuses_a_teacher_with_another_vocabulary(tiny_models, heldout_file, tmp_path, capsys):
    from grpo_kd.tiny import train_tokenizer

    other = tmp_path / "other-teacher"
    train_tokenizer(heldout_file.read_text(encoding="utf-8").splitlines() * 3, 300).save_pretrained(str(other))
    code = main(["evaluate", "--checkpoint", str(tiny_models.student), "--teacher", str(other), "--suite", "distill",
                 "--out", str(tmp_path / "r"), f"eval.heldout_text={heldout_file}"])
    assert code == 1
    assert "vocabulary" in _one_error_line(capsys) and not (tmp_path / "r").exists()


def test_euroeval_missing(tiny_models, heldout_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite_module, "euroeval_launcher", lambda: None)
    assert main(["evaluate", "--checkpoint", str(tiny_models.student), "--suite", "euroeval", "--out", str(tmp_path)]) == 1
    assert "EuroEval is not installed: pip install euroeval (" in _one_error_line(capsys)
    code = main(["evaluate", "--checkpoint", str(tiny_models.student), "--suite", "diversity,euroeval",
                 "--out", str(tmp_path), f"eval.heldout_text={heldout_file}", *FAST])
    assert code == 0
    result = json.loads((tmp_path / "eval_student.json").read_text(encoding="utf-8"))
    assert result["suites"] == ["diversity"] and result["warnings"][0].startswith("euroeval skipped: EuroEval is not installed")


def test_run_evaluations_and_report(tiny_models, heldout_file, tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_models.student, run / "checkpoints" / "iter_0001")
    (run / "config.yaml").write_text(f"eval:\n  heldout_text: {heldout_file}\n  max_new_tokens: 10\n", encoding="utf-8")
    base = ["evaluate", "--suite", "diversity", "eval.prompt_words=3"]
    # the initial model as iteration 0, then the run's checkpoint (reports land in RUN/reports by themselves)
    assert main([*base, "--checkpoint", str(tiny_models.student), "--config", str(run / "config.yaml"),
                 "--out", str(run / "reports"), "--name", "iter_0000"]) == 0
    assert main([*base, "--checkpoint", str(run / "checkpoints" / "iter_0001")]) == 0
    first = json.loads((run / "reports" / "eval_iter_0001.json").read_text(encoding="utf-8"))
    assert first["iteration"] == 1 and first["diversity"]["baseline"]["distinct_2"] is not None  # iter_0000's
    # a baseline far above the model: every distinct-n is flagged
    fake = tmp_path / "baseline.json"
    fake.write_text(json.dumps({"diversity": {"distinct_1": 5, "distinct_2": 5, "distinct_3": 5, "repetition_rate": 0}}))
    assert main([*base, "--checkpoint", str(run / "checkpoints" / "iter_0001"), "--baseline", str(fake)]) == 0
    flagged = json.loads((run / "reports" / "eval_iter_0001.json").read_text(encoding="utf-8"))
    assert len(flagged["diversity"]["collapse_warnings"]) == 3
    assert flagged["warnings"][0].startswith("possible mode collapse: distinct_1 fell to")

    rows = [{"step": s, "iteration": 1, "loss": 1.0 / (s + 1), "reward/teacher_loglik": -3 + 0.1 * s, "kl": 0.01 * s,
             "clip_fraction": 0.1, "entropy": 2.0, "grad_norm": 0.5, "tokens_per_second": 100.0, "note": "x", "time": {"rollout_s": 2.0}} for s in range(6)]
    (run / "logs").mkdir()
    (run / "logs" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{cut sho", encoding="utf-8")
    assert main(["report", str(run)]) == 0
    markdown = (run / "reports" / "report.md").read_text(encoding="utf-8")
    assert "| reward/teacher_loglik | -3 | -2.5 | -3 | -2.5 |" in markdown and "| time/rollout_s | 2 |" in markdown
    assert "| iter_0000 |" in markdown and "| iter_0001 |" in markdown and "possible mode collapse" in markdown
    for png in ("learning_curves.png", "evaluations.png"):
        assert (run / "reports" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_with_nothing_to_report(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "has nothing to report" in _one_error_line(capsys)
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "run directory not found" in _one_error_line(capsys)


def test_perplexity_on_faroese_treebank(tiny_models, faroese_dir):
    from grpo_kd.data import load_texts

    cfg = load_config(None, ["eval.max_examples=24", "eval.batch_size=8"])
    source = faroese_dir / "farpahc-dev.conllu"
    result = suite_module.evaluate_checkpoint(tiny_models.student, suites="perplexity", texts=str(source), cfg=cfg)
    texts = load_texts(str(source), limit=24)
    ppl = result["perplexity"]
    assert ppl["num_texts"] == 24 and ppl["num_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert 0 < ppl["bits_per_byte"] < 20 and ppl["num_tokens"] > 24


def test_cross_tokenizer_teacher_score_when_asked(tiny_models, tiny_student_other_vocab):
    cfg = load_config(None, ["eval.distill_cross_tokenizer=true", "eval.max_new_tokens=8"])
    result = suite_module.evaluate_checkpoint(tiny_student_other_vocab, tiny_models.teacher, suites="distill", cfg=cfg,
                                              prompts=["Tórshavn er", "Í Føroyum eru"])
    distill = result["distill"]
    assert distill["kl_method"].startswith("none") and "forward_kl" not in distill
    assert distill["num_samples"] == 2 and distill["teacher_nll_per_byte"] > 0 and distill["teacher_logprob_mean"] < 0


def test_distill_against_the_informed_self(tiny_models, tmp_path, capsys):
    """teacher.kind=self_privileged: the teacher is the model with each prompt's privileged text before it. The
    KL equals one from full logits on the informed prompts, and is exactly 0 when the template drops the text."""
    from grpo_kd.models import load_causal_lm, load_tokenizer

    rows = [{"id": f"q{i}", "prompt": p, "answer": a} for i, (p, a) in enumerate(
        [("Tórshavn er", "Tórshavn er høvuðsstaðurin."), ("Í Føroyum eru", "átjan oyggjar"),
         ("Bóndin fór", "niður til sjóvar at fiska.")])]
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = ["--checkpoint", str(tiny_models.student), "--suite", "distill", "--out", str(tmp_path / "reports"),
              f"model.path={tiny_models.student}", f"data.heldout_prompts={prompts}", "data.privileged_field=answer",
              "teacher.kind=self_privileged", "eval.max_new_tokens=6", "eval.batch_size=2", "seed=3"]

    def run(name: str, template: str) -> dict:
        assert main(["evaluate", *common, "--name", name, f"teacher.prompt_template=\"{template}\""]) == 0
        return json.loads((tmp_path / "reports" / f"eval_{name}.json").read_text())

    plain = run("plain", "{prompt}")
    assert plain["distill"]["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    informed = run("informed", "Svar: {privileged} | {prompt}")
    assert "informed" in informed["teacher"]

    tok = load_tokenizer(str(tiny_models.student))
    model = load_causal_lm(str(tiny_models.student), device="cpu")
    from grpo_kd.evaluate.generation import generate

    texts = [r["prompt"] for r in rows]
    samples = generate(model, tok, texts, max_new_tokens=6, do_sample=True, batch_size=2, seed=3)
    reverse = []
    for s, r in zip(samples, rows):
        teacher_prompt = tok(f"Svar: {r['answer']} | {r['prompt']}")["input_ids"]
        q_ids, p_ids = torch.tensor([s.prompt_ids + s.completion_ids]), torch.tensor([teacher_prompt + s.completion_ids])
        C = len(s.completion_ids)
        with torch.no_grad():
            log_q = torch.log_softmax(model(q_ids).logits[0, -C - 1 : -1].double(), -1)  # (C, V)
            log_p = torch.log_softmax(model(p_ids).logits[0, -C - 1 : -1].double(), -1)  # (C, V)
        reverse += (log_q.exp() * (log_q - log_p)).sum(-1).tolist()
    assert informed["distill"]["reverse_kl"] == pytest.approx(sum(reverse) / len(reverse), rel=1e-4)
    assert informed["distill"]["reverse_kl"] > 1e-3
