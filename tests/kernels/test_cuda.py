"""The compiled Triton kernels on a real GPU (marker `gpu`; skipped without CUDA): Triton against the torch twin
on the same CUDA tensors, through the autotuned launches of launch.plan_launch. Run by benchmarks/gpu_check.sh
with TRITON_INTERPRET=0 (the interpreter would otherwise run them on the CPU). Shapes are odd in N and V and
16-aligned in H, so both the masked edges and the pipelined loads are exercised.
"""

import os

import pytest
import torch

from grpo_kd.kernels import linear_grpo_loss, linear_logprobs, linear_sparse_kl, linear_topk
from grpo_kd.kernels._common import interpreter_on

from ._compare import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or interpreter_on(),
                       reason="needs TRITON_INTERPRET=0 (compiled kernels, not the interpreter)"),
]
N, H, V, K = 333, 320, 4099, 24
RTOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-4, 2e-2)}  # (values, gradients) x max |expected|


def _inputs(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, H, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=gen) / H**0.5).to(dtype)
    bias = torch.randn(V, device="cuda", generator=gen).to(dtype)
    return hidden, weight, bias


def _both(fn, dtype, **kw):
    """(triton, twin) outputs and gradients of fn(hidden, weight, bias, impl)."""
    results = []
    for impl in ("triton", "torch"):
        hidden, weight, bias = (t.detach().requires_grad_() for t in _inputs(dtype))
        out = fn(hidden, weight, bias, impl)
        out.backward()
        results.append((out.detach(), hidden.grad, weight.grad, bias.grad))
    return results


def _assert_both_agree(fn, dtype) -> None:
    """Triton's value and its hidden, weight and bias gradients equal the twin's, to `RTOL[dtype]`."""
    (tv, *tg), (ev, *eg) = _both(fn, dtype)
    rv, rg = RTOL[dtype]
    assert_close(tv, ev, rtol=rv, name="value")
    for name, a, b in zip(("hidden", "weight", "bias"), tg, eg):
        assert_close(a, b, rtol=rg, name=f"grad {name}")


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products on both paths
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy(dtype):
    ids = torch.randint(0, V, (N,), device="cuda")

    def fn(h, w, b, impl):
        logp, lse, ent = linear_logprobs(h, w, ids, bias=b, softcap=20.0, temperature=0.9, return_entropy=True,
                                         impl=impl)
        return logp.sum() + 0.3 * ent.sum() + 0.1 * lse.sum()

    _assert_both_agree(fn, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence, tail", [("reverse", "bucket"), ("jsd", "uniform"), ("forward", "uniform")])
def test_sparse_kl(dtype, divergence, tail):
    gen = torch.Generator(device="cuda").manual_seed(5)
    ids = torch.stack([torch.randperm(V, device="cuda", generator=gen)[:K] for _ in range(N)])  # (N, K) distinct
    logp = torch.log_softmax(torch.randn(N, K, device="cuda", generator=gen), -1) + torch.log(torch.tensor(0.9))

    def fn(h, w, b, impl):
        return linear_sparse_kl(h, w, ids, logp, divergence=divergence, tail=tail, bias=b, impl=impl)

    _assert_both_agree(fn, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_loss(dtype):
    B, T = 9, N // 9
    ids = torch.randint(0, V, (B, T), device="cuda")
    mask = (torch.rand(B, T, device="cuda") > 0.2).float()
    adv = torch.randn(B, device="cuda")
    old = -8.3 + 0.3 * torch.randn(B, T, device="cuda")

    def fn(h, w, b, impl):
        return linear_grpo_loss(h[: B * T].view(B, T, H), w, ids, mask, adv, old_logprobs=old, ref_logprobs=old,
                                beta=0.04, bias=b, impl=impl)[0]

    _assert_both_agree(fn, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 20, 100, 256])
def test_topk(dtype, k):
    hidden, weight, bias = _inputs(dtype, seed=k)
    targets = torch.randint(0, V, (N,), device="cuda")
    kw = dict(bias=bias, softcap=30.0, temperature=0.8, target_ids=targets)
    tri = linear_topk(hidden, weight, k, impl="triton", **kw)
    twin = linear_topk(hidden, weight, k, impl="torch", **kw)
    scale = twin[2].abs().max().item()
    for name, a, b in zip(("log-probs", "lse", "target log-probs"), tri[1:], twin[1:]):
        assert_close(a, b, rtol=0.0, atol=2e-6 * max(scale, 1.0) * (1 if dtype == torch.float32 else 10), name=name)
    gaps = twin[1].diff(dim=-1).abs()
    clear = torch.ones_like(twin[0], dtype=torch.bool)
    clear[:, 1:] &= gaps > 1e-4
    clear[:, :-1] &= gaps > 1e-4
    assert (tri[0][clear] == twin[0][clear]).all()
