"""The rollout sampler on real tiny Llamas: KV-cache steps against float64 full-sequence references.

What is asserted exactly and what only up to rounding:
- batched (left-padded, KV cache) and one-row-at-a-time sampling give the *same tokens* for the same row
  seeds — rows draw from their own generators, so only float rounding of the probabilities could move a token
  across a CDF boundary (chance ~1e-6 per token; these seeds are checked) — and log-probs equal to 1e-5;
- the log-probs of the loop and of the recompute equal log-softmax of the full float64 logits at the sampled
  tokens to 1e-4 (float32 model against float64 truth);
- alpha = 1 draws exactly the teacher's tokens, alpha = 0 exactly the student's.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from grpo_kd.models import load_causal_lm, load_tokenizer
from grpo_kd.train.rollout import mixture_logprobs, recorded_logprobs
from grpo_kd.train.sampling import SamplingParams, inverse_cdf, sample_batch, truncate

TEXTS = ["Eg eri", "Tað var einaferð ein gamal maður, sum búði", "Hvar", "Í gjár fóru vit til Havnar"]


@pytest.fixture(scope="session")
def tiny(tiny_models):
    """The shared tiny pair of tests/conftest.py (one tokenizer, pre-trained a few steps)."""
    return tiny_models


@pytest.fixture(scope="module")
def models(tiny):
    student = load_causal_lm(str(tiny.student), dtype="float32", device="cpu").eval()
    teacher = load_causal_lm(str(tiny.teacher), dtype="float32", device="cpu").eval()
    return student, teacher, load_tokenizer(str(tiny.student))


def _prompts(tokenizer, group_size=2):
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    return [p for p in ids for _ in range(group_size)]  # rows: each prompt G times, lengths differ


def _seeds(count, offset=0):
    return [1000 + offset + r for r in range(count)]


def _eos_that_stops_some_rows(free_samples):
    """An id that row 0 samples after its first token and some other row never samples, from a run without eos:
    with it as eos, some rows stop early and some run to the length limit, whatever the weights."""
    for token in free_samples[0].completion_ids[1:]:
        if any(token not in s.completion_ids for s in free_samples[1:]):
            return {token}
    raise AssertionError("no usable eos candidate")


@torch.no_grad()
def _reference_logprobs(model, prompt, completion, temperature):
    """log-softmax of the full float64 logits at the completion tokens, one unpadded row: (C,)."""
    ids = torch.tensor([list(prompt) + list(completion)])  # (1, L)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()  # (C, V)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)  # (C,)


@pytest.fixture(scope="module")
def model64(models):
    return copy.deepcopy(models[0]).double(), copy.deepcopy(models[1]).double()


def test_batched_left_padded_sampling_equals_one_row_at_a_time(models):
    student, _, tokenizer = models
    prompts = _prompts(tokenizer)
    seeds = _seeds(len(prompts))
    params = SamplingParams(max_new_tokens=10, temperature=0.8)
    free = sample_batch(student, prompts, seeds, params, eos_ids=set(), pad_id=tokenizer.pad_token_id)
    eos = _eos_that_stops_some_rows(free)
    batched = sample_batch(student, prompts, seeds, params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    assert len({len(s.completion_ids) for s in batched}) > 1  # rows finished at different steps
    for prompt, seed, together in zip(prompts, seeds, batched):
        alone = sample_batch(student, [prompt], [seed], params, eos_ids=eos, pad_id=tokenizer.pad_token_id)[0]
        assert alone.completion_ids == together.completion_ids
        assert alone.finish_reason == together.finish_reason
        torch.testing.assert_close(torch.tensor(alone.sampling_logprobs), torch.tensor(together.sampling_logprobs),
                                   rtol=0, atol=1e-5)


def test_same_seed_same_tokens_other_seed_other_tokens(models):
    student, _, tokenizer = models
    prompts = _prompts(tokenizer, group_size=1)
    params = SamplingParams(max_new_tokens=8)
    eos = {tokenizer.eos_token_id}
    first = sample_batch(student, prompts, _seeds(4), params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    again = sample_batch(student, prompts, _seeds(4), params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    other = sample_batch(student, prompts, _seeds(4, offset=50), params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    assert [s.completion_ids for s in first] == [s.completion_ids for s in again]
    assert [s.completion_ids for s in first] != [s.completion_ids for s in other]


def test_eos_ends_a_completion_and_is_kept(models):
    """With an eos, each row is its eos-free completion cut just after the first eos (the same seeds)."""
    student, _, tokenizer = models
    params = SamplingParams(max_new_tokens=6)
    prompts = _prompts(tokenizer, group_size=2)
    seeds = _seeds(len(prompts))
    free = sample_batch(student, prompts, seeds, params, eos_ids=set(), pad_id=tokenizer.pad_token_id)
    assert {s.finish_reason for s in free} == {"length"}
    eos = _eos_that_stops_some_rows(free)
    stopped = sample_batch(student, prompts, seeds, params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    assert {s.finish_reason for s in stopped} == {"stop", "length"}
    for without, s in zip(free, stopped):
        assert len(s.sampling_logprobs) == len(s.completion_ids) >= 1
        hits = [t for t, token in enumerate(without.completion_ids) if token in eos]
        if hits:
            assert s.finish_reason == "stop" and s.completion_ids == without.completion_ids[: hits[0] + 1]
        else:
            assert s.finish_reason == "length" and s.completion_ids == without.completion_ids
            assert len(s.completion_ids) == params.max_new_tokens


def test_logprobs_equal_float64_full_logits_and_the_recompute(models, model64):
    student, _, tokenizer = models
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9)  # truncation is not recorded
    pad = tokenizer.pad_token_id
    samples = sample_batch(student, prompts, _seeds(len(prompts)), params, eos_ids={tokenizer.eos_token_id}, pad_id=pad)
    old, student_lp, _ = recorded_logprobs(student, None, prompts, samples, params, pad)
    assert student_lp is None
    for r, (prompt, s) in enumerate(zip(prompts, samples)):
        n = len(s.completion_ids)
        reference = _reference_logprobs(model64[0], prompt, s.completion_ids, params.temperature)  # (C,)
        torch.testing.assert_close(old[r, :n].double(), reference, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(s.sampling_logprobs, dtype=torch.float64), reference, rtol=0, atol=1e-4)
        assert torch.all(old[r, n:] == 0)


def test_top_k_one_and_tiny_top_p_are_greedy(models, model64):
    student, _, tokenizer = models
    prompts = _prompts(tokenizer, group_size=1)
    eos = {tokenizer.eos_token_id}
    for params in (SamplingParams(max_new_tokens=6, top_k=1), SamplingParams(max_new_tokens=6, top_p=1e-6)):
        samples = sample_batch(student, prompts, _seeds(4), params, eos_ids=eos, pad_id=tokenizer.pad_token_id)
        for prompt, s in zip(prompts, samples):
            ids = torch.tensor([list(prompt) + s.completion_ids])
            with torch.no_grad():
                logits = model64[0](input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (C, V)
            assert logits.argmax(-1).tolist() == s.completion_ids


def test_truncate_keeps_top_k_then_the_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert truncate(probs, 3, 1.0)[0].tolist() == pytest.approx([0, 0.4, 0.3, 0.15, 0])
    # nucleus 0.6: 0.4 alone is below it, 0.4 + 0.3 reaches it -> keep two tokens
    assert (truncate(probs, 0, 0.6)[0] > 0).tolist() == [False, True, True, False, False]
    assert (truncate(probs, 0, 0.5)[1] > 0).sum() == 3  # ties: the sort order decides, the mass rule holds


def test_inverse_cdf_follows_the_weights_and_never_picks_a_zero():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0]]).expand(40000, -1)  # (R, V) unnormalised
    uniforms = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = inverse_cdf(weights, uniforms)
    counts = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert counts[[0, 2, 5]].tolist() == [0, 0, 0]
    expected = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(counts[[1, 3, 4]], expected, atol=0.01, rtol=0)
    edge = inverse_cdf(weights[:2], torch.tensor([0.0, 1.0 - 1e-16], dtype=torch.float64))
    assert edge.tolist() == [1, 4]


def test_teacher_mix_alpha_one_draws_the_teachers_tokens(models, model64):
    student, teacher, tokenizer = models
    prompts = _prompts(tokenizer)
    seeds = _seeds(len(prompts))
    pad, eos = tokenizer.pad_token_id, {tokenizer.eos_token_id}
    mixed_params = SamplingParams(max_new_tokens=8, temperature=0.9, teacher_mix_alpha=1.0)
    mixed = sample_batch(student, prompts, seeds, mixed_params, eos_ids=eos, pad_id=pad, teacher=teacher)
    alone = sample_batch(teacher, prompts, seeds, SamplingParams(max_new_tokens=8, temperature=0.9), eos_ids=eos,
                         pad_id=pad)
    assert [s.completion_ids for s in mixed] == [s.completion_ids for s in alone]
    old, student_lp, _ = recorded_logprobs(student, teacher, prompts, mixed, mixed_params, pad)
    for r, (prompt, s) in enumerate(zip(prompts, mixed)):
        n = len(s.completion_ids)
        teacher_ref = _reference_logprobs(model64[1], prompt, s.completion_ids, 0.9)
        student_ref = _reference_logprobs(model64[0], prompt, s.completion_ids, 0.9)
        in_loop = torch.tensor(s.sampling_logprobs, dtype=torch.float64)
        torch.testing.assert_close(old[r, :n].double(), teacher_ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(in_loop, teacher_ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(student_lp[r, :n].double(), student_ref, rtol=0, atol=1e-4)


def test_teacher_mix_alpha_zero_is_the_plain_student(models):
    student, teacher, tokenizer = models
    prompts = _prompts(tokenizer)
    seeds = _seeds(len(prompts))
    params = SamplingParams(max_new_tokens=8, teacher_mix_alpha=0.0)
    pad, eos = tokenizer.pad_token_id, {tokenizer.eos_token_id}
    with_teacher = sample_batch(student, prompts, seeds, params, eos_ids=eos, pad_id=pad, teacher=teacher)
    plain = sample_batch(student, prompts, seeds, params, eos_ids=eos, pad_id=pad)
    assert with_teacher == plain


def test_teacher_mix_stores_the_mixture_logprob(models, model64):
    student, teacher, tokenizer = models
    prompts = _prompts(tokenizer)
    alpha = 0.3
    params = SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.95, teacher_mix_alpha=alpha)
    pad = tokenizer.pad_token_id
    samples = sample_batch(student, prompts, _seeds(len(prompts)), params, eos_ids={tokenizer.eos_token_id},
                           pad_id=pad, teacher=teacher)
    old, student_lp, _ = recorded_logprobs(student, teacher, prompts, samples, params, pad)
    for r, (prompt, s) in enumerate(zip(prompts, samples)):
        n = len(s.completion_ids)
        p = _reference_logprobs(model64[1], prompt, s.completion_ids, 1.2).exp()
        q = _reference_logprobs(model64[0], prompt, s.completion_ids, 1.2).exp()
        mixture = torch.log(alpha * p + (1 - alpha) * q)  # (C,) float64
        torch.testing.assert_close(old[r, :n].double(), mixture, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(s.sampling_logprobs, dtype=torch.float64), mixture, rtol=0, atol=1e-4)
        torch.testing.assert_close(student_lp[r, :n].double(), q.log(), rtol=0, atol=1e-4)


def test_mixture_logprobs_is_exact_at_the_ends():
    teacher, student = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -0.5])
    assert torch.equal(mixture_logprobs(teacher, student, 1.0), teacher)
    assert torch.equal(mixture_logprobs(teacher, student, 0.0), student)
    expected = torch.log(0.25 * teacher.exp() + 0.75 * student.exp())
    torch.testing.assert_close(mixture_logprobs(teacher, student, 0.25), expected)


@pytest.mark.parametrize(
    "field, value, message",
    [("temperature", 0.0, "temperature must be > 0"), ("top_p", 0.0, "top_p must be in (0, 1]"),
     ("top_k", -1, "top_k must be >= 0"), ("teacher_mix_alpha", 1.5, "teacher_mix_alpha must be in [0, 1]"),
     ("max_new_tokens", 0, "max_new_tokens must be at least 1")],
)
def test_bad_sampling_parameters_are_one_line_errors(field, value, message):
    from grpo_kd.errors import GrpoKdError

    with pytest.raises(GrpoKdError, match=re.escape(message)):
        SamplingParams(**{field: value}).check()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window KV cache layers, padded head rows
def test_dropping_finished_rows_changes_no_token(arch, tiny_family, monkeypatch):
    """Finished rows leave the batch (and every KV cache, the mixing teacher's too): the same tokens, finish reasons
    and log-probs as the sampler that decodes every row to the end (`COMPACT_FRACTION` = inf: no row is dropped,
    the loop as it was), while the student's decoding steps shrink."""
    from grpo_kd.train import sampling

    models = tiny_family(arch)
    tokenizer = load_tokenizer(str(models.student))
    student = load_causal_lm(str(models.student), vocab_size=len(tokenizer)).eval()
    teacher = load_causal_lm(str(models.teacher), vocab_size=len(tokenizer)).eval()
    prompts = _prompts(tokenizer, group_size=3)  # 12 rows
    seeds = _seeds(len(prompts))
    params = SamplingParams(max_new_tokens=10, teacher_mix_alpha=0.5)
    monkeypatch.setattr(sampling, "COMPACT_FRACTION", float("inf"))
    free = sample_batch(student, prompts, seeds, params, eos_ids={-1}, pad_id=tokenizer.pad_token_id, teacher=teacher)
    eos = {free[r].completion_ids[r % 4 + 1] for r in range(0, len(free), 3)}  # rows stop at different steps
    sizes: list[int] = []
    hook = student.get_decoder().register_forward_pre_hook(lambda _, args, kw: sizes.append(len(kw["input_ids"])),
                                                           with_kwargs=True)
    runs = {}
    for fraction in (float("inf"), 0.0, 0.125):
        monkeypatch.setattr(sampling, "COMPACT_FRACTION", fraction)
        sizes.clear()
        runs[fraction] = (sample_batch(student, prompts, seeds, params, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                                       teacher=teacher), list(sizes))
    hook.remove()
    reference, full_sizes = runs[float("inf")]
    lengths = sorted({len(s.completion_ids) for s in reference})
    assert len(lengths) >= 3 and any(s.finish_reason == "length" for s in reference)  # rows end at many steps
    assert set(full_sizes) == {len(prompts)}
    for fraction in (0.0, 0.125):
        samples, steps = runs[fraction]
        assert [s.completion_ids for s in samples] == [s.completion_ids for s in reference]
        assert [s.finish_reason for s in samples] == [s.finish_reason for s in reference]
        for got, want in zip(samples, reference):
            torch.testing.assert_close(torch.tensor(got.sampling_logprobs), torch.tensor(want.sampling_logprobs),
                                       atol=1e-5, rtol=1e-5)
        assert steps == sorted(steps, reverse=True) and sum(steps) < sum(full_sizes)
