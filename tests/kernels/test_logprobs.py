"""linear_logprobs against a float64 full-logits reference, on both implementations."""

import pytest
import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels import _common, linear_logprobs

from ._compare import TOLERANCES, assert_close
from ._reference import ref_logprobs

N, H, V = 37, 48, 1031

CONFIGS = {
    "plain": dict(temperature=1.0, softcap=None, bias=False),
    "bias_temp": dict(temperature=0.7, softcap=None, bias=True),
    "softcap_temp": dict(temperature=1.3, softcap=4.0, bias=True),
}


def _inputs(gen, dtype, lead=(N,), bias=False):
    hidden = torch.randn(*lead, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None
    ids = torch.randint(0, V, lead, generator=gen)
    return hidden, weight, b, ids


def _run(fn, hidden, weight, bias, upstream):
    """Forward, then backward with a random upstream gradient on all three outputs."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    lp, lse, ent = fn()
    (lp * upstream[0] + lse * upstream[1] + ent * upstream[2]).sum().backward()
    grads = [None if t is None else t.grad.clone() for t in (hidden, weight, bias)]
    return (lp.detach(), lse.detach(), ent.detach()), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(impl, dtype, config, gen):
    cfg = CONFIGS[config]
    hidden, weight, bias, ids = _inputs(gen, dtype, bias=cfg["bias"])
    upstream = [torch.randn(N, generator=gen) for _ in range(3)]
    kw = dict(temperature=cfg["temperature"], softcap=cfg["softcap"])
    out, grads = _run(lambda: linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, impl=impl, **kw),
                      hidden, weight, bias, upstream)
    ref_out, ref_grads = _run(lambda: ref_logprobs(hidden, weight, ids, bias, **kw), hidden, weight, bias, upstream)
    tol = TOLERANCES[dtype]
    for name, a, e in zip(("logprobs", "lse", "entropy"), out, ref_out):
        assert a.dtype == torch.float32
        assert_close(a, e, rtol=tol["value"], name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        if e is not None:
            assert a.dtype == dtype
            assert_close(a, e, rtol=tol["grad"], name=name)


def test_batch_time_shape_and_chunks(impl, gen, small_chunks):
    """[B, T, H] input, several row chunks: per-token outputs take the [B, T] shape."""
    hidden, weight, bias, ids = _inputs(gen, torch.float32, lead=(3, 13), bias=True)
    upstream = [torch.randn(3, 13, generator=gen) for _ in range(3)]
    kw = dict(temperature=0.9, softcap=6.0)
    out, grads = _run(lambda: linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, impl=impl, **kw),
                      hidden, weight, bias, upstream)
    ref_out, ref_grads = _run(lambda: ref_logprobs(hidden, weight, ids, bias, **kw), hidden, weight, bias, upstream)
    for a, e in zip(out + tuple(grads), ref_out + tuple(ref_grads)):
        assert a.shape == e.shape
        assert_close(a, e, rtol=5e-5)


@pytest.mark.skipif(not _common.triton_available(), reason="triton not importable")
def test_triton_equals_torch_twin(gen):
    hidden, weight, bias, ids = _inputs(gen, torch.float32, bias=True)
    upstream = [torch.randn(N, generator=gen) for _ in range(3)]
    results = {}
    for impl in ("torch", "triton"):
        results[impl] = _run(
            lambda: linear_logprobs(hidden, weight, ids, bias=bias, temperature=0.8, softcap=5.0,
                                    return_entropy=True, impl=impl),
            hidden, weight, bias, upstream)
    (o1, g1), (o2, g2) = results["torch"], results["triton"]
    for a, e in zip(o2 + tuple(g2), o1 + tuple(g1)):
        assert_close(a, e, rtol=1e-5)


def test_without_entropy_returns_none(impl, gen):
    hidden, weight, _, ids = _inputs(gen, torch.float32, lead=(5,))
    lp, lse, ent = linear_logprobs(hidden, weight, ids, impl=impl)
    assert ent is None and lp.shape == (5,) and lse.shape == (5,)
    lp.sum().backward()  # the gradient without the entropy pass is still the exact one
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_logprobs(h64, w64, ids)[0].sum().backward()
    assert_close(hidden.grad, h64.grad, rtol=1e-5, name="hidden.grad")
    assert_close(weight.grad, w64.grad, rtol=1e-5, name="weight.grad")


def test_frozen_weight_gets_no_gradient(impl, gen):
    hidden, weight, _, ids = _inputs(gen, torch.float32, lead=(6,))
    weight.requires_grad_(False)
    lp, _, _ = linear_logprobs(hidden, weight, ids, impl=impl)
    lp.sum().backward()
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(hidden=torch.randn(4)), "hidden"),
        (dict(weight=torch.randn(V, H + 1)), "weight"),
        (dict(token_ids=torch.full((4,), V)), "token_ids"),
        (dict(token_ids=torch.full((4,), -1)), "token_ids"),
        (dict(token_ids=torch.zeros(5, dtype=torch.long)), "token_ids"),
        (dict(token_ids=torch.zeros(4)), "token_ids"),
        (dict(bias=torch.randn(V + 1)), "bias"),
        (dict(weight=torch.randn(V, H, dtype=torch.float64)), "weight"),
        (dict(impl="cuda"), "impl"),
        (dict(temperature=0.0), "temperature"),
        (dict(softcap=-1.0), "softcap"),
    ],
)
def test_bad_input_raises_one_line(bad, match):
    args = dict(hidden=torch.randn(4, H), weight=torch.randn(V, H), token_ids=torch.zeros(4, dtype=torch.long))
    kwargs = {k: bad.pop(k) for k in list(bad) if k in ("bias", "impl", "temperature", "softcap")}
    args.update(bad)
    with pytest.raises(GrpoKdError, match=match) as info:
        linear_logprobs(args["hidden"], args["weight"], args["token_ids"], **kwargs)
    assert "\n" not in str(info.value)


def test_impl_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    assert _common.resolve_impl("auto", cpu) == "torch"
    assert _common.resolve_impl("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(GrpoKdError, match="TRITON_INTERPRET"):
        _common.resolve_impl("triton", cpu)
    monkeypatch.setattr(_common, "triton_available", lambda: False)
    with pytest.raises(GrpoKdError, match="not importable"):
        _common.resolve_impl("triton", cpu)
    assert _common.resolve_impl("auto", cpu) == "torch"
