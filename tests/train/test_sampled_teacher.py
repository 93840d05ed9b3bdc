"""`loss.teacher_kl.estimate=sampled`: the teacher KL from the cache's m teacher samples (the unbiased forward-KL
estimate), on the real tiny pair: its loss and gradient equal a dense float64 reference on the same samples, its
gradient averaged over sampling seeds of the teacher pass's sampler is the full-vocabulary forward-KL gradient
(where top-k's is measurably biased), it trains, and it refuses a cache or config it cannot serve in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ..kernels._reference import ref_sampled_forward_kl
from ._update_helpers import build_run, copy_run, first_step, make_config
from grpo_kd.cache.reader import CacheReader
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import lm_head, load_student, load_teacher
from grpo_kd.paths import RunPaths
from grpo_kd.train.algorithms.common import Context, StepNorm, check_teacher_estimate, teacher_kl
from grpo_kd.train.distributed import TrainModule
from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.teacher_samples import sample_teacher
from grpo_kd.train.update import run_update

M = 8  # teacher samples per token
SAMPLED = ("loss.teacher_kl.estimate=sampled", "loss.teacher_kl.divergence=forward")


@pytest.fixture(scope="module")
def sampled_run(tiny_models, tmp_path_factory):
    """Rollouts and a cache with top-8 and 8 samples per token, from the pre-trained tiny teacher."""
    run = tmp_path_factory.mktemp("sampled") / "template"
    cfg = make_config(run, tiny_models, f"teacher.num_samples={M}", "loss.algorithm=privileged", *SAMPLED)
    build_run(cfg)
    paths = RunPaths.of(run)
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch(list(range(6)))
    return run, cfg, batch


@pytest.fixture(scope="module")
def student_hidden(sampled_run):
    """The student's completion hidden states of the whole batch (B, T, H), detached, and its context."""
    _, cfg, batch = sampled_run
    policy = load_student(cfg.model, trainable=True)
    module = TrainModule(policy)
    mask = batch.completion_mask
    ctx = Context(module=module, policy=policy, norm=StepNorm(mask.shape[0], int(mask.sum())), impl="torch")
    with torch.no_grad():
        hidden, _ = module(batch.input_ids, batch.attention_mask, batch.prompt_lengths, batch.completion_ids.shape[1])
    return hidden, ctx


def loss_and_grad(hidden: torch.Tensor, loss_fn) -> tuple[float, torch.Tensor]:
    """A scalar loss of the hidden states (B, T, H) and its gradient with respect to them (float64)."""
    leaf = hidden.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf)
    loss.backward()
    return float(loss.detach()), leaf.grad.double()


def dense_student_logprobs(hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
    head = lm_head(ctx.policy)
    logits = hidden.double() @ head.weight.double().T  # (B, T, V)
    return torch.log_softmax(logits if head.bias is None else logits + head.bias.double(), dim=-1)


def test_sampled_kl_equals_a_dense_float64_reference_on_the_cached_samples(sampled_run, student_hidden):
    _, cfg, batch = sampled_run
    hidden, ctx = student_hidden
    mask = batch.completion_mask.double()  # (B, T)

    def reference(h):  # sum_t sum_j w_j (log p_j - log q_j) / N, from dense float64 student log-probs
        log_q = dense_student_logprobs(h, ctx).gather(-1, batch.teacher_sample_ids)  # (B, T, m)
        per_token = (batch.teacher_sample_weights.double() * (batch.teacher_sample_logprobs.double() - log_q)).sum(-1)
        return (per_token * mask).sum() / mask.sum()

    loss, grad = loss_and_grad(hidden, lambda h: teacher_kl(h, batch, cfg, ctx)[0])
    ref_loss, ref_grad = loss_and_grad(hidden, reference)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_sampled_gradient_averages_to_the_full_forward_kl_gradient(sampled_run, student_hidden):
    """Unbiased: over S seeds of the teacher pass's sampler, the mean gradient's squared error to the exact
    full-vocabulary forward-KL gradient is what the sampling noise alone gives (tr Cov / S); top-k's error
    (tail="bucket", the best top-k forward KL) is far above that, so this test would see a bias."""
    _, cfg, batch = sampled_run
    hidden, ctx = student_hidden
    mask = batch.completion_mask  # (B, T)
    teacher = load_teacher(cfg.teacher, cfg.model)
    t_head = lm_head(teacher)
    with torch.no_grad():
        t_hidden, _ = TrainModule(teacher)(batch.input_ids, batch.attention_mask, batch.prompt_lengths,
                                           mask.shape[1])  # (B, T, H)
        t_logits = t_hidden.double() @ t_head.weight.double().T  # (B, T, V), softcap None, temperature 1
        t_logp = torch.log_softmax(t_logits / cfg.teacher.temperature, dim=-1)

    def exact(h):  # KL(p || q) over the full vocabulary, token mean
        kl = (t_logp.exp() * (t_logp - dense_student_logprobs(h, ctx))).sum(-1)  # (B, T)
        return (kl * mask).sum() / mask.sum()

    _, exact_grad = loss_and_grad(hidden, exact)
    grads = []
    for seed in range(256):
        ids, weights, logprobs = sample_teacher(t_hidden[mask], t_head.weight, t_head.bias, M, seed=seed,
                                                temperature=cfg.teacher.temperature, softcap=t_head.softcap)
        drawn = {name: torch.zeros(*mask.shape, M, dtype=dtype) for name, dtype in
                 (("ids", torch.long), ("weights", torch.float32), ("logprobs", torch.float32))}
        drawn["ids"][mask], drawn["weights"][mask] = torch.from_numpy(ids).long(), torch.from_numpy(weights)
        drawn["logprobs"][mask] = torch.from_numpy(logprobs)
        seeded = batch._replace(teacher_sample_ids=drawn["ids"], teacher_sample_weights=drawn["weights"],
                                teacher_sample_logprobs=drawn["logprobs"])
        grads.append(loss_and_grad(hidden, lambda h: teacher_kl(h, seeded, cfg, ctx)[0])[1])
    grads = torch.stack(grads)  # (S, B, T, H)
    noise = grads.var(0).sum() / len(grads)  # E |mean - truth|^2 for an unbiased estimator
    error = (grads.mean(0) - exact_grad).square().sum()
    topk = dataclasses.replace(cfg, loss=dataclasses.replace(
        cfg.loss, teacher_kl=dataclasses.replace(cfg.loss.teacher_kl, estimate="topk")))
    _, topk_grad = loss_and_grad(hidden, lambda h: teacher_kl(h, batch, topk, ctx)[0])
    topk_error = (topk_grad - exact_grad).square().sum()
    print(f"sampled mean: error {error:.3g}, noise {noise:.3g} (ratio {error / noise:.2f}), relative "
          f"{(error / exact_grad.square().sum()).sqrt():.3f}; top-k: error {topk_error:.3g}, relative "
          f"{(topk_error / exact_grad.square().sum()).sqrt():.3f}")
    assert error <= 3 * noise
    assert (error / exact_grad.square().sum()).sqrt() < 0.1
    assert topk_error > 20 * noise


def test_training_with_the_sampled_estimate(sampled_run, tiny_models, tmp_path):
    """MiniLLM with the sampled forward KL as its single-step term: three steps, logged, finite."""
    template, _, _ = sampled_run
    run = copy_run(template, tmp_path / "run")
    cfg = make_config(run, tiny_models, "loss.algorithm=minillm", *SAMPLED, f"teacher.num_samples={M}",
                      "optim.micro_batch_size=8", "optim.grad_accum=1")
    run_update(cfg, 1)
    records = MetricsLog(RunPaths.of(run).metrics).read()
    assert len(records) == 3
    batch, logits = first_step(cfg)  # step 1's logged KL: the sampled estimate of the initial student, by hand
    mask = batch.completion_mask
    per_token = ref_sampled_forward_kl(logits[mask], batch.teacher_sample_ids[mask],
                                       batch.teacher_sample_logprobs[mask], batch.teacher_sample_weights[mask])
    assert records[0]["teacher_kl"] == pytest.approx(float(per_token.mean()), rel=1e-4)


def test_sampled_estimate_refuses_another_divergence_or_a_cache_without_samples(sampled_run, tiny_models, tmp_path):
    template, cfg, batch = sampled_run
    run = copy_run(template, tmp_path / "run")
    with pytest.raises(GrpoKdError, match="estimates the forward KL only.*set loss.teacher_kl.divergence=forward"):
        make_config(run, tiny_models, "loss.algorithm=privileged", "loss.teacher_kl.estimate=sampled",
                    f"teacher.num_samples={M}")  # a rule of the config: refused when it is loaded
    no_samples = batch._replace(teacher_sample_ids=None, teacher_sample_weights=None, teacher_sample_logprobs=None)
    with pytest.raises(GrpoKdError, match="needs teacher samples in the cache.*teacher.num_samples > 0"):
        check_teacher_estimate(no_samples, cfg)
