"""linear_grpo_loss against an independent float64 spelling of TRL's GRPOTrainer loss."""

import pytest
import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels import linear_grpo_loss

from ._compare import TOLERANCES, assert_close
from ._reference import ref_grpo_loss, ref_logprobs

B, T, H, V = 3, 11, 40, 517


def _batch(gen, dtype=torch.float32, per_token_adv=False, bias=False):
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.3).to(dtype).requires_grad_() if bias else None
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[0, 7:] = 0  # a short completion
    mask[2, :] = 0  # an all-masked row
    mask[1, 3] = 0  # a hole
    ids[0, 7:] = -100  # padding may hold anything
    adv = torch.randn(B, T, generator=gen) if per_token_adv else torch.randn(B, generator=gen)
    with torch.no_grad():
        lp, _, _ = ref_logprobs(hidden, weight, ids.clamp(min=0), b, temperature=0.9)
    old = (lp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()  # some ratios get clipped
    ref = (lp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    old[0, 7:] = float("nan")  # padding garbage must not leak
    ref[0, 7:] = float("-inf")
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def _grads(loss, tensors):
    for t in tensors:
        if t is not None:
            t.grad = None
    loss.backward()
    return [None if t is None else t.grad.clone() for t in tensors]


def _check(batch, impl, dtype=torch.float32, use_old=True, beta=0.04, **kw):
    params = (batch["hidden"], batch["weight"], batch["bias"])
    old = batch["old"] if use_old else None
    loss, metrics = linear_grpo_loss(
        batch["hidden"], batch["weight"], batch["ids"], batch["mask"], batch["adv"], old_logprobs=old,
        ref_logprobs=batch["ref"], beta=beta, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9,
        bias=batch["bias"], impl=impl, **kw)
    grads = _grads(loss, params)
    valid = batch["mask"] != 0
    lp, _, _ = ref_logprobs(batch["hidden"], batch["weight"], batch["ids"].clamp(min=0), batch["bias"], temperature=0.9)
    ref_old = None if old is None else torch.where(valid, old, torch.zeros_like(old))
    ref_ref = torch.where(valid, batch["ref"], torch.zeros_like(batch["ref"]))
    ref_loss, ref_metrics = ref_grpo_loss(
        lp, batch["mask"], batch["adv"], ref_old, ref_ref, beta, 0.2, 0.28,
        kw.get("loss_type", "dapo"), kw.get("importance_sampling_level", "token"), kw.get("max_completion_length"))
    ref_grads = _grads(ref_loss, params)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref_loss, rtol=tol["value"] * 10, name="loss")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        if e is not None:
            assert_close(a, e, rtol=tol["grad"], name=name)
    for name, value in ref_metrics.items():
        assert_close(metrics[name], value, rtol=1e-4, atol=1e-6, name=name)
    return metrics


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types_and_levels(loss_type, level, gen):
    batch = _batch(gen, bias=True)
    _check(batch, "torch", loss_type=loss_type, importance_sampling_level=level)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_per_token_advantages(level, gen):
    batch = _batch(gen, per_token_adv=True, bias=True)
    metrics = _check(batch, "triton", loss_type="grpo", importance_sampling_level=level)
    if level == "token":
        assert metrics["clip_fraction"] > 0  # the perturbed old log-probs clip some tokens


@pytest.mark.parametrize("use_old", [True, False])
def test_old_logprobs_given_or_none(impl, use_old, gen):
    batch = _batch(gen)
    metrics = _check(batch, impl, use_old=use_old, loss_type="bnpo", max_completion_length=20)
    if not use_old:
        assert metrics["ratio"].item() == pytest.approx(1.0) and metrics["clip_fraction"].item() == 0.0


def test_dr_grpo_max_completion_length(gen):
    batch = _batch(gen)
    _check(batch, "torch", loss_type="dr_grpo", max_completion_length=32)


def test_bf16(impl, gen):
    batch = _batch(gen, dtype=torch.bfloat16, bias=True)
    _check(batch, impl, dtype=torch.bfloat16, loss_type="grpo")


def test_fully_masked_batch_is_zero_without_nan(impl, gen):
    batch = _batch(gen, bias=True)
    batch["mask"] = torch.zeros(B, T)
    for level in ("token", "sequence"):
        loss, metrics = linear_grpo_loss(
            batch["hidden"], batch["weight"], batch["ids"], batch["mask"], batch["adv"], old_logprobs=batch["old"],
            ref_logprobs=batch["ref"], beta=0.1, bias=batch["bias"], impl=impl, importance_sampling_level=level,
            loss_type="grpo")
        grads = _grads(loss, (batch["hidden"], batch["weight"], batch["bias"]))
        assert loss.item() == 0.0
        for g in grads:
            assert g is not None and torch.count_nonzero(g) == 0
        for name in ("clip_low", "clip_high", "clip_fraction", "kl", "entropy"):  # sums over no token
            assert float(metrics[name]) == 0.0, (level, name, metrics[name])


def test_beta_needs_reference(gen):
    batch = _batch(gen)
    with pytest.raises(GrpoKdError, match="ref_logprobs"):
        linear_grpo_loss(batch["hidden"], batch["weight"], batch["ids"], batch["mask"], batch["adv"], beta=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="word"), "importance_sampling_level"),
        (dict(epsilon_low=1.5), "epsilon_low"),
        (dict(advantages=torch.zeros(B + 1)), "advantages"),
        (dict(mask=torch.ones(B, T + 1)), "mask"),
        (dict(old_logprobs=torch.zeros(B)), "old_logprobs"),
        (dict(hidden=torch.randn(B, T + 1, H)), "hidden"),
    ],
)
def test_bad_input(kwargs, match, gen):
    batch = _batch(gen)
    args = dict(hidden=batch["hidden"], weight=batch["weight"], token_ids=batch["ids"], mask=batch["mask"],
                advantages=batch["adv"])
    for key in list(kwargs):
        if key in args:
            args[key] = kwargs.pop(key)
    with pytest.raises(GrpoKdError, match=match):
        linear_grpo_loss(*args.values(), **kwargs)
