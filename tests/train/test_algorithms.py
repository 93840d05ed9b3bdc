"""Each algorithm's loss and gradient against an independent float64 reference built here from dense logits,
micro-batch x accumulation equivalence for every loss type, and cached teacher == live teacher."""

from __future__ import annotations


import pytest
import torch

from ._update_helpers import build_run, make_config
from grpo_kd.cache.reader import CacheReader
from grpo_kd.models import load_causal_lm, load_student, lm_head
from grpo_kd.paths import RunPaths
from grpo_kd.train import algorithms
from grpo_kd.train.algorithms.common import Context, StepNorm, take_prepared, take_rows
from grpo_kd.train.distributed import TrainModule, new_value_head


@pytest.fixture(scope="module")
def setup(tiny_models_quick, tmp_path_factory):
    run = tmp_path_factory.mktemp("algorithms") / "run"
    cfg = make_config(run, tiny_models_quick)
    build_run(cfg)
    paths = RunPaths.of(run)
    batch = CacheReader.open(paths.rollouts(1), paths.teacher(1)).batch(list(range(6)))
    torch.manual_seed(0)
    noise = 0.3 * torch.randn(batch.old_logprobs.shape) * batch.completion_mask  # ratios != 1: clipping is live
    batch = batch._replace(old_logprobs=batch.old_logprobs + noise)
    return cfg, batch


def student(cfg, value_head=False):
    policy = load_student(cfg.model, trainable=True)
    module = TrainModule(policy, new_value_head(policy) if value_head else None)
    return module


def context(module, cfg, batch) -> Context:
    mask = batch.completion_mask
    norm = StepNorm(sequences=mask.shape[0], tokens=int(mask.sum()), world_size=1)
    return Context(module=module, policy=module.policy, norm=norm, impl="torch")


def kernel_loss_and_grads(name, cfg, batch, module, micro_rows=None):
    """Loss and parameter gradients through the algorithm (micro-batches of `micro_rows`, accumulated)."""
    algorithm = algorithms.get(name)
    ctx = context(module, cfg, batch)
    with torch.no_grad():
        prepared = algorithm.prepare(batch, cfg, ctx)
    module.zero_grad(set_to_none=True)
    B = batch.completion_ids.shape[0]
    step = micro_rows or B
    total = 0.0
    for start in range(0, B, step):
        rows = list(range(start, min(start + step, B)))
        micro = take_rows(batch, rows)
        loss, _ = algorithm.micro_loss(micro, take_prepared(prepared, rows, micro.completion_ids.shape[1]), cfg, ctx)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- dense references


def dense_logq(module, batch):
    """(B, T, V) float64 student log-probs from dense logits, differentiable."""
    hidden, values = module(batch.input_ids, batch.attention_mask, batch.prompt_lengths, batch.completion_ids.shape[1])
    head = lm_head(module.policy)
    logits = hidden.double() @ head.weight.double().T  # (B, T, V)
    return torch.log_softmax(logits, dim=-1), values


def surrogate(logp, batch, adv, eps, beta):
    """Per-token clipped surrogate + beta k3, (B, T); adv (B, 1) or (B, T)."""
    ratio = torch.exp(logp - batch.old_logprobs.double())
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    ref = batch.ref_logprobs.double()
    return loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)


def group_norm(r, G=4):
    g = r.view(-1, G)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)


def reverse_kl_bucket(logq, batch):
    """(B, T) KL(q || p) over the k teacher ids plus one rest bucket."""
    q_s = torch.gather(logq, -1, batch.teacher_topk_ids).exp()  # (B, T, k)
    p_s = batch.teacher_topk_logprobs.double().exp()
    q_r, p_r = (1 - q_s.sum(-1)).clamp(min=1e-12), (1 - p_s.sum(-1)).clamp(min=1e-8)
    return (q_s * (q_s.log() - p_s.log())).sum(-1) + q_r * (q_r.log() - p_r.log())


def ppo_token_rewards(cfg, batch):
    """(B, T) float64 PPO rewards written from the formulas: sequence rewards at the last token, token rewards at
    every token, and with kl_in_reward -beta (log q_old - log q_ref) at every token; with length_normalize every
    per-token term divided by its completion's length."""
    m = batch.completion_mask.double()
    lengths = m.sum(1)
    per_token = 1 / lengths[:, None] if cfg.loss.ppo.length_normalize else torch.ones_like(lengths)[:, None]
    teacher, old = batch.teacher_logprobs.double(), batch.old_logprobs.double()
    default = {"log_ratio": 1.0} if cfg.loss.reward.kind == "minillm" else {"teacher_loglik": 1.0}
    reward = torch.zeros_like(m)
    for name, w in (cfg.loss.reward.weights or default).items():
        if name in ("teacher_loglik", "length"):
            for b in range(m.shape[0]):
                score = (teacher[b] * m[b]).sum() / lengths[b] if name == "teacher_loglik" else \
                    lengths[b] / cfg.rollout.max_new_tokens
                reward[b, int(lengths[b]) - 1] += w * score
        elif name == "teacher_logprob":
            reward += w * teacher * m * per_token
        elif name == "log_ratio":
            reward += w * (teacher - old) * m * per_token
        else:
            raise AssertionError(name)
    if cfg.loss.ppo.kl_in_reward:
        reward -= cfg.loss.policy.beta * (old - batch.ref_logprobs.double()) * m * per_token
    return reward


def reference_loss(name, cfg, batch, module):
    m = batch.completion_mask.double()
    N = m.sum()
    logq, values = dense_logq(module, batch)
    logp = torch.gather(logq, -1, batch.completion_ids[..., None]).squeeze(-1) * m  # (B, T)
    lengths = m.sum(1)
    if name in ("grpo", "self_distill"):
        source = batch.teacher_logprobs if name == "grpo" else batch.ref_logprobs
        # the reward in float32, as cached: group normalisation amplifies its rounding when a group's std is tiny
        reward = ((source * batch.completion_mask).sum(1) / batch.completion_mask.sum(1)).double()
        per_token = surrogate(logp, batch, group_norm(reward)[:, None], 0.2, cfg.loss.policy.beta)
        return (per_token * m).sum() / N
    if name == "minillm":
        mixed = batch.student_logprobs is not None  # teacher-mixed sampling: behaviour = mixture, not the student
        q_old = (batch.student_logprobs if mixed else batch.old_logprobs).double()
        w = (q_old - batch.old_logprobs.double()).exp().clamp(0.8, 1.2) if mixed else torch.ones_like(m)
        r = (batch.teacher_logprobs.double() - q_old) * m
        gamma = cfg.loss.minillm.gamma
        returns = torch.zeros_like(r)  # LMOps: R_t = 1/(L-t) sum_{u>=t} gamma^(u-t) r_u, then whitened
        for b in range(r.shape[0]):
            L = int(lengths[b])
            for t in range(L):
                returns[b, t] = sum(gamma ** (u - t) * r[b, u] for u in range(t, L)) / (L - t)
        mean = (returns * m).sum() / N
        adv = (returns - mean) * torch.rsqrt(((returns - mean) ** 2 * m).sum() / N + 1e-8) * m
        long_term = (surrogate(logp, batch, adv, cfg.loss.minillm.importance_clip, cfg.loss.policy.beta) * m).sum() / N
        return long_term + (w * reverse_kl_bucket(logq, batch) * m).sum() / N
    if name == "privileged":
        return (reverse_kl_bucket(logq, batch) * m).sum() / N
    if name == "ppo":  # value head starts at 0: V_old = 0, so A = GAE of rewards alone, returns = A
        reward = ppo_token_rewards(cfg, batch)
        adv = torch.zeros_like(m)
        for b in range(m.shape[0]):
            running, L = 0.0, int(lengths[b])
            for t in reversed(range(L)):
                running = reward[b, t] + cfg.loss.ppo.gamma * cfg.loss.ppo.gae_lambda * running
                adv[b, t] = running
        returns = adv.clone()
        mean = (adv * m).sum() / N
        white = (adv - mean) * torch.rsqrt(((adv - mean) ** 2 * m).sum() / N + 1e-8) * m
        beta = 0.0 if cfg.loss.ppo.kl_in_reward else cfg.loss.policy.beta  # the KL is either a reward or a loss
        policy = (surrogate(logp, batch, white, 0.2, beta) * m).sum() / N
        v = values.double()
        v_loss = (0.5 * torch.maximum((v - returns) ** 2, (v.clamp(-0.2, 0.2) - returns) ** 2) * m).sum() / N
        return policy + cfg.loss.ppo.value_coef * v_loss
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["grpo", "ppo", "minillm", "self_distill", "privileged"])
def test_algorithm_matches_dense_float64_reference(setup, name):
    cfg, batch = setup
    cfg.loss.algorithm = name
    module = student(cfg, value_head=(name == "ppo"))
    loss, grads = kernel_loss_and_grads(name, cfg, batch, module)
    module.zero_grad(set_to_none=True)
    expected = reference_loss(name, cfg, batch, module)
    expected.backward()
    # the surrogate sums terms of size ~|A| ~ 1 that cancel (advantages sum to 0): float32 leaves ~1e-6 absolute
    assert loss == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-5)
    for n, p in module.named_parameters():
        if p.grad is None:
            continue
        scale = p.grad.abs().max().item() + 1e-8
        err = (grads[n] - p.grad).abs().max().item()
        assert err <= 2e-4 * scale + 1e-7, f"{name}: gradient of {n} differs by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("weights,kind,kl_in_reward,normalize", [
    ({"teacher_logprob": 1.0}, "teacher_loglik", False, False),  # the teacher's log-prob paid at every token
    ({}, "minillm", False, False),  # the MiniLLM-style reward log p_T - log q at every token
    ({"teacher_loglik": 1.0}, "teacher_loglik", True, False),  # classic RLHF PPO: sequence score + per-token KL
    ({"teacher_logprob": 1.0, "length": 0.5}, "teacher_loglik", True, False),
    ({}, "minillm", True, True),  # per-token terms / L: the first token's return is a mean, as GRPO's reward
    ({"teacher_logprob": 1.0, "length": 0.5}, "teacher_loglik", False, True),  # a sequence term is not divided
])  # fmt: skip
def test_ppo_rewards_per_token_and_kl_as_a_reward(setup, weights, kind, kl_in_reward, normalize):
    cfg, batch = setup
    cfg.loss.algorithm = "ppo"
    cfg.loss.reward.weights, cfg.loss.reward.kind, cfg.loss.ppo.kl_in_reward = weights, kind, kl_in_reward
    cfg.loss.ppo.length_normalize = normalize
    try:
        module = student(cfg, value_head=True)
        prepared = algorithms.get("ppo").prepare(batch, cfg, context(module, cfg, batch))
        loss, grads = kernel_loss_and_grads("ppo", cfg, batch, module)
        module.zero_grad(set_to_none=True)
        expected = reference_loss("ppo", cfg, batch, module)
        rewards = ppo_token_rewards(cfg, batch)
    finally:
        cfg.loss.reward.weights, cfg.loss.reward.kind, cfg.loss.ppo.kl_in_reward = {}, "teacher_loglik", False
        cfg.loss.ppo.length_normalize = False
    assert torch.allclose(prepared.rewards["total"].double(), rewards, atol=1e-5)
    if kl_in_reward:
        k1 = (batch.old_logprobs - batch.ref_logprobs) * batch.completion_mask
        assert torch.allclose(prepared.rewards["kl_penalty"], -cfg.loss.policy.beta * k1, atol=1e-6)
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-5)
    for n, p in module.named_parameters():
        if p.grad is not None:
            scale = p.grad.abs().max().item() + 1e-8
            assert (grads[n] - p.grad).abs().max().item() <= 2e-4 * scale + 1e-7, n


def test_minillm_teacher_mixed_importance_weights(setup):
    cfg, batch = setup
    cfg.loss.algorithm = "minillm"
    torch.manual_seed(1)
    student_logprobs = (batch.old_logprobs + 0.5 * torch.randn(batch.old_logprobs.shape)) * batch.completion_mask
    mixed = batch._replace(student_logprobs=student_logprobs)
    module = student(cfg)
    loss, _ = kernel_loss_and_grads("minillm", cfg, mixed, module)
    expected = reference_loss("minillm", cfg, mixed, module)
    assert loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert loss != pytest.approx(kernel_loss_and_grads("minillm", cfg, batch, module)[0], rel=1e-3)


def test_minillm_return_does_not_reward_stopping(setup):
    """A log-ratio that is the same at every token (the teacher agrees with the student equally everywhere) says
    nothing about where to stop. Eq. 7 taken literally gives the last token a return of 0 and every other one the
    negative reward, favouring the end; LMOps' return (current step included, whitened) gives every token the
    same advantage at gamma = 1, and at its gamma = 0.95 (the count, not the discount weights, divides the sum)
    the last token the lowest."""
    cfg, batch = setup
    cfg.loss.algorithm = "minillm"
    m = batch.completion_mask.float()
    constant = batch._replace(old_logprobs=-2.0 * m, teacher_logprobs=-3.5 * m)  # log p_T - log q = -1.5, exactly
    last = (m * (m.cumsum(1) == m.sum(1, keepdim=True))).bool()  # (B, T) each completion's last token
    rest = m.bool() & ~last

    def advantages(gamma):
        cfg.loss.minillm.gamma = gamma
        try:
            return algorithms.get("minillm").prepare(constant, cfg, context(student(cfg), cfg, constant)).advantages
        finally:
            cfg.loss.minillm.gamma = 0.95

    flat = advantages(1.0)  # (B, T)
    assert flat[last].abs().max() < 1e-3 and flat[rest].abs().max() < 1e-3, (flat[last].mean(), flat[rest].mean())
    discounted = advantages(0.95)
    assert discounted[last].max() < discounted[rest].min()


@pytest.mark.parametrize("name,loss_type,level", [
    ("grpo", "dapo", "token"), ("grpo", "bnpo", "token"), ("grpo", "grpo", "token"), ("grpo", "dr_grpo", "token"),
    ("grpo", "grpo", "sequence"), ("ppo", "dapo", "token"), ("minillm", "grpo", "token"),
])  # fmt: skip
def test_micro_batches_sum_to_the_whole_batch(setup, name, loss_type, level):
    cfg, batch = setup
    cfg.loss.algorithm, cfg.loss.policy.loss_type, cfg.loss.policy.importance_sampling_level = name, loss_type, level
    try:
        module = student(cfg, value_head=(name == "ppo"))
        whole, grads = kernel_loss_and_grads(name, cfg, batch, module)
        split, split_grads = kernel_loss_and_grads(name, cfg, batch, module, micro_rows=5)  # uneven: 5+5+5+5+4
    finally:
        cfg.loss.policy.loss_type, cfg.loss.policy.importance_sampling_level = "dapo", "token"
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-7)
    for n, g in grads.items():
        assert torch.allclose(split_grads[n], g, rtol=1e-4, atol=1e-7), n


def live_teacher_batch(cfg, batch, k):
    """The batch with its teacher fields computed now by the teacher model (float32, never stored)."""
    from grpo_kd.kernels import linear_topk
    from grpo_kd.models import final_hidden_states
    from grpo_kd.cache.reader import completion_hidden

    teacher = load_causal_lm(cfg.teacher.path)
    with torch.no_grad():
        hidden = final_hidden_states(teacher, batch.input_ids, batch.attention_mask.long())
        hidden = completion_hidden(hidden, batch.prompt_lengths, batch.completion_ids.shape[1])  # (B, T, H)
        head = lm_head(teacher)
        ids, logprobs, _, target = linear_topk(hidden, head.weight, k, bias=head.bias, softcap=head.softcap,
                                               target_ids=batch.completion_ids)
    m = batch.completion_mask
    return batch._replace(teacher_topk_ids=ids.long() * m[..., None], teacher_topk_logprobs=logprobs * m[..., None],
                          teacher_logprobs=target * m)


@pytest.mark.parametrize("name", ["grpo", "minillm"])
def test_cached_teacher_equals_live_teacher(setup, name):
    cfg, batch = setup
    cfg.loss.algorithm = name
    live = live_teacher_batch(cfg, batch, cfg.teacher.top_k)
    module = student(cfg)
    cached_loss, cached_grads = kernel_loss_and_grads(name, cfg, batch, module)
    live_loss, live_grads = kernel_loss_and_grads(name, cfg, live, module)
    # top-k log-probs are stored in float16 (relative rounding 2^-11); the sampled-token log-prob in float32
    tol = 1e-6 if name == "grpo" else 2e-3
    assert cached_loss == pytest.approx(live_loss, rel=tol, abs=tol)
    for n, g in live_grads.items():
        scale = g.abs().max().item() + 1e-8
        assert (cached_grads[n] - g).abs().max().item() <= 5 * tol * scale, n


def test_live_reference_with_adapters_off_equals_the_cached_reference(setup):
    from grpo_kd.train.distributed import Dist
    from grpo_kd.train.update_state import Reference

    cfg, batch = setup
    cfg.model.lora = True
    try:
        policy = load_student(cfg.model, trainable=True)
        with torch.no_grad():  # move the adapters away from their zero start, so "off" matters
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn_like(p))
        live = Reference(cfg, policy, Dist())(batch)
    finally:
        cfg.model.lora = False
    assert torch.allclose(live, batch.ref_logprobs, atol=1e-4), (live - batch.ref_logprobs).abs().max()


def test_pretraining_loss_is_the_dense_nll_and_its_draw_splits_over_ranks(setup, tmp_path):
    import dataclasses

    from grpo_kd.models import load_tokenizer
    from grpo_kd.tiny import BUILTIN_CORPUS
    from grpo_kd.train.pretrain import PretrainBatches, pretrain_loss

    cfg, _ = setup
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pretrain_text=str(BUILTIN_CORPUS)),
                              loss=dataclasses.replace(cfg.loss, pt=dataclasses.replace(cfg.loss.pt, seq_len=12,
                                                                                     batch_size=4)))
    batches = PretrainBatches(cfg, load_tokenizer(cfg.model.path))
    blocks = batches.draw(iteration=1, step=0)  # (4, 12)
    assert blocks.shape == (4, 12) and torch.equal(blocks, batches.draw(iteration=1, step=0))
    assert not torch.equal(blocks, batches.draw(iteration=1, step=1))
    halves = torch.cat([batches.draw(1, 0, rank=0, world_size=2), batches.draw(1, 0, rank=1, world_size=2)])
    assert sorted(map(tuple, halves.tolist())) == sorted(map(tuple, blocks.tolist()))
    module = student(cfg)
    loss = pretrain_loss(module, module.policy, blocks, scale=1.0 / batches.tokens_per_step, impl="torch")
    hidden = module.policy.model(blocks).last_hidden_state  # (4, 12, H)
    logits = hidden.double() @ lm_head(module.policy).weight.double().T
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, blocks[:, 1:, None]).mean()
    assert loss.item() == pytest.approx(nll.item(), rel=1e-5)


def test_lr_schedule_warmup_then_decay():
    from grpo_kd.config import OptimConfig
    from grpo_kd.train.optim import lr_factor

    cfg = OptimConfig(lr_schedule="linear", warmup_steps=2)
    assert [lr_factor(s, cfg, 6) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cfg = OptimConfig(lr_schedule="cosine")
    assert lr_factor(0, cfg, 4) == 1.0 and lr_factor(2, cfg, 4) == pytest.approx(0.5) and lr_factor(4, cfg, 4) == 0.0
