"""Each model reads the conversation in its own format: the student samples from its plain prompt, the teacher of
each family (`teacher.chat_template=true`) scores exactly the student's completion tokens after the same prompt
rendered through its own chat template; a teacher with another vocabulary scores its own tokens of its rendering
and the completion text; and a teacher mixed into the sampling (MiniLLM) is conditioned on its own format too."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from grpo_kd.cache.reader import CacheReader
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cli.app import main
from grpo_kd.models import load_tokenizer
from grpo_kd.paths import RunPaths
from grpo_kd.tiny import BUILTIN_CORPUS
from grpo_kd.tiny_families import FAMILIES

# How each family's chat format opens a user turn (what the teacher must see, and the student must not).
TURN_OPENS = {"llama": "<|user|>\n", "mistral": "<s>[INST] ", "gemma3": "<bos><start_of_turn>user\n",
              "gpt2": "<|endoftext|><s>\nUser:\n"}


def _run(tmp_path, name: str, student, teacher, *, teacher_section: dict, rollout: dict | None = None) -> RunPaths:
    cfg = {
        "name": name, "output_dir": str(tmp_path),
        "model": {"path": str(student)},
        "teacher": {"path": str(teacher), "top_k": 4, "reference": False, "chat_template": True, **teacher_section},
        "data": {"prompts": str(BUILTIN_CORPUS), "format": "text", "prefix_words": 4, "chat_template": False},
        "rollout": {"prompts_per_iteration": 2, "group_size": 2, "max_new_tokens": 6, "batch_size": 2,
                    **(rollout or {})},
    }
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["rollout", "--config", str(config), "--iteration", "1"]) == 0
    if not (rollout or {}).get("teacher_mix_alpha"):
        assert main(["cache-teacher", "--config", str(config), "--iteration", "1"]) == 0
    return RunPaths.of(tmp_path / name)


def _own_prompt(tokenizer, text: str, opens: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.startswith(opens)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _logprobs(model, vocab: int, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(C,) log-probs of `completion` after `prompt` from the model's own forward, over the tokenizer's ids."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1, :vocab].float()  # (C, V) position P+t-1 predicts t
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("arch", FAMILIES)
def test_teacher_scores_the_completion_in_its_own_format(arch, tiny_family, tmp_path):
    models = tiny_family(arch)
    paths = _run(tmp_path, arch, models.student, models.teacher, teacher_section={})
    student_tok, teacher_tok = load_tokenizer(str(models.student)), load_tokenizer(str(models.teacher))
    teacher = AutoModelForCausalLM.from_pretrained(str(models.teacher)).eval()
    store = RolloutStore.open(paths.rollouts(1))
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch([0, 1])
    for b in range(len(batch.index)):
        record = store[int(batch.index[b])]
        assert list(record.prompt_ids) == student_tok(record.prompt_text)["input_ids"]  # the student: plain
        prompt = _own_prompt(teacher_tok, record.prompt_text, TURN_OPENS[arch])
        expected = _logprobs(teacher, len(teacher_tok), prompt, list(record.completion_ids))
        C = len(record.completion_ids)
        torch.testing.assert_close(batch.teacher_logprobs[b, :C], expected, atol=2e-5, rtol=1e-5)


def test_teacher_with_another_vocabulary_in_its_own_format(tiny_family, tmp_path):
    """A Mistral student, a Gemma-3 teacher, sampled rollouts: the teacher scores its own tokens of the prompt in
    Gemma's chat format, the completion text (the rollout's, exactly what the student's tokens spell) and, after a
    finished completion, <end_of_turn>, tokenized together; the per-token values sum to that log-likelihood."""
    student, teacher_models = tiny_family("mistral"), tiny_family("gemma3")
    paths = _run(tmp_path, "cross", student.student, teacher_models.teacher, teacher_section={})
    teacher_tok = load_tokenizer(str(teacher_models.teacher))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_models.teacher)).eval()
    store = RolloutStore.open(paths.rollouts(1))
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch([0, 1])
    assert batch.teacher_topk_ids is None  # no top-k across vocabularies
    for b in range(len(batch.index)):
        record = store[int(batch.index[b])]
        prompt = _own_prompt(teacher_tok, record.prompt_text, TURN_OPENS["gemma3"])
        end = "<end_of_turn>" if record.finish_reason == "stop" else ""
        rendered = teacher_tok.decode(prompt)
        whole = teacher_tok(rendered + record.completion_text + end, add_special_tokens=False)["input_ids"]
        assert whole[:len(prompt)] == prompt  # the chat prompt ends in a newline: no token crosses the boundary
        expected = float(_logprobs(teacher, len(teacher_tok), prompt, whole[len(prompt):]).sum())
        assert batch.teacher_seq_logprob[b].item() == pytest.approx(expected, abs=1e-4)
        assert batch.teacher_logprobs[b].double().sum().item() == pytest.approx(expected, abs=1e-4)


def test_mixing_teacher_reads_its_own_format(tiny_family, tmp_path):
    """MiniLLM's teacher-mixed sampling: old_logprobs = log(a p_T + (1 - a) q_S) with p_T after the teacher's chat
    rendering of the prompt and q_S after the student's plain one."""
    models = tiny_family("llama")
    alpha = 0.5
    paths = _run(tmp_path, "mixed", models.student, models.teacher, teacher_section={},
                 rollout={"teacher_mix_alpha": alpha})
    teacher_tok = load_tokenizer(str(models.teacher))
    teacher = AutoModelForCausalLM.from_pretrained(str(models.teacher)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(models.student)).eval()
    store = RolloutStore.open(paths.rollouts(1))
    for i in range(len(store)):
        record = store[i]
        completion = list(record.completion_ids)
        p_t = _logprobs(teacher, len(teacher_tok), _own_prompt(teacher_tok, record.prompt_text, TURN_OPENS["llama"]),
                        completion)
        q_s = _logprobs(student, len(teacher_tok), list(record.prompt_ids), completion)
        expected = torch.logaddexp(p_t + math.log(alpha), q_s + math.log(1 - alpha))
        torch.testing.assert_close(torch.as_tensor(record.student_logprobs), q_s, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(torch.as_tensor(record.old_logprobs), expected, atol=2e-5, rtol=1e-5)
