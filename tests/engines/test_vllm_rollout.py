"""vLLM's sampling with a LoRA student: the adapter is applied, and a completion depends only on its own seed.

One engine start (base weights + a LoRA adapter whose B matrices are far from zero, so the adapter changes
every log-prob): the trainer's recomputed log-probs of vLLM's tokens (with the adapter, `policy.py`) agree with
vLLM's own, which they could not if vLLM had served the base alone; and rows sampled again in another batch,
in another order, come out token for token the same.
"""

from __future__ import annotations

import pytest
import torch

from grpo_kd.config import load_config
from grpo_kd.train.rollout import recorded_logprobs, sample_seed
from grpo_kd.train.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _adapter_checkpoint(student_dir, out):
    """checkpoints/iter_0001/model of a LoRA student: a peft adapter with random, clearly non-zero weights."""
    from peft import LoraConfig, get_peft_model

    from grpo_kd.models import load_causal_lm

    model = get_peft_model(load_causal_lm(str(student_dir), dtype="float32", device="cpu"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out / "model")
    return out


def test_lora_student_is_served_and_seeds_fix_each_completion(vllm_models, needs_vllm, tmp_path):
    from grpo_kd.engines.vllm_engine import open_engine
    from grpo_kd.engines.vllm_rollout import generate, student_eos_ids, student_source
    from grpo_kd.models import load_student, load_tokenizer

    checkpoint = _adapter_checkpoint(vllm_models.student, tmp_path / "iter_0001")
    cfg = load_config(None, [f"model.path={vllm_models.student}", "model.lora=true", "model.lora_r=8",
                             "rollout.engine=vllm", "vllm.enforce_eager=true"])
    source = student_source(cfg, checkpoint)
    assert source.adapter == checkpoint / "model" and source.lora_rank == 8
    tokenizer = load_tokenizer(str(vllm_models.student))
    prompts = [tokenizer(text)["input_ids"] for text in ("The sea is", "Hon sigur at tað", "A boat")] * 2
    seeds = [sample_seed(7, 2, group, index) for group, index in ((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1))]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0)
    eos = student_eos_ids(source, tokenizer)
    with open_engine(cfg, source, max_model_len=64, max_logprobs=1, requests=len(prompts)) as llm:
        samples = generate(llm, source, prompts, seeds, params, eos)
        again = generate(llm, source, [prompts[4], prompts[1]], [seeds[4], seeds[1]], params, eos)
    assert [s.completion_ids for s in again] == [samples[4].completion_ids, samples[1].completion_ids]
    assert samples[0].completion_ids != samples[3].completion_ids  # one prompt, two seeds

    student = load_student(cfg.model, checkpoint=str(checkpoint), trainable=False)
    old, _, mask = recorded_logprobs(student, None, prompts, samples, params, tokenizer.pad_token_id)
    sampler = torch.zeros_like(old)
    for row, sample in enumerate(samples):
        sampler[row, : len(sample.sampling_logprobs)] = torch.tensor(sample.sampling_logprobs)
    assert ((old - sampler).abs() * mask).max() < 1e-4  # vLLM sampled from the student with its adapter
    base = load_student(cfg.model, checkpoint=None, trainable=False)
    base_lp, _, _ = recorded_logprobs(base, None, prompts, samples, params, tokenizer.pad_token_id)
    assert ((base_lp - sampler).abs() * mask).sum() / mask.sum() > 0.05  # ... which is not the base model
