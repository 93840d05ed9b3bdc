"""`linear_topk` against a float64 reference written here (full logits on tiny shapes), on both paths.

The Triton kernel runs on CPU tensors through Triton's interpreter. Ties: the top-k of random float data has no
exact ties, so ids are compared through the reference (the ids returned must point at the reference's top-k
values); exact ties are tested on their own with logits that are bit-identical by construction.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grpo_kd.errors import GrpoKdError  # noqa: E402
from grpo_kd.kernels import linear_topk  # noqa: E402
from grpo_kd.kernels._common import triton_available  # noqa: E402
from grpo_kd.kernels.topk import TopkLaunch, decode_keys, encode_keys  # noqa: E402
from ._compare import assert_close  # noqa: E402

IMPLS = ["torch", "triton"] if triton_available() else ["torch"]
N, H, V = 37, 48, 1031
VALUE_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6}  # x max |z|: fp32 accumulation of exact products only
TRANSFORMS = {  # name -> (use bias, temperature, softcap, hidden scale)
    "plain": (False, 1.0, None, 1.0),
    "bias_temperature": (True, 0.7, None, 1.0),
    "softcap_temperature": (True, 1.3, 4.0, 3.0),
    "large_logits": (False, 1.0, None, 40.0),
}


def _inputs(shape, dtype, seed, use_bias=False, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=gen) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=gen) if use_bias else None
    return hidden, weight, bias


def _reference(hidden, weight, bias, temperature, softcap):
    """float64 (log q over the full vocabulary, lse, max |z|), from the inputs as given (bf16 upcast exactly)."""
    x = hidden.double() @ weight.double().T  # (..., V)
    if bias is not None:
        x = x + bias.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    z = x / temperature
    lse = torch.logsumexp(z, dim=-1)
    return z - lse[..., None], lse, z.abs().max().item()


def _check_topk(out, ref_logq, ref_lse, k, rtol, z_scale):
    """The returned ids are a valid top-k of the reference, sorted, with the reference's log-probs and lse.

    Errors are bounded by rtol * max |z|: float32 logits carry an absolute error proportional to their size,
    which a log-prob z - lse keeps even when it is small itself."""
    atol = rtol * max(z_scale, 1.0)
    ids, logprobs, lse, _ = out
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32 and lse.dtype == torch.float32
    assert ids.shape == ref_logq.shape[:-1] + (k,) and lse.shape == ref_lse.shape
    assert not logprobs.requires_grad and not lse.requires_grad
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all(), "log-probs are not sorted descending"
    flat_ids = ids.reshape(-1, k).long()
    assert ((flat_ids >= 0) & (flat_ids < ref_logq.shape[-1])).all()
    assert (flat_ids.sort(dim=1).values.diff(dim=1) > 0).all(), "repeated ids in a row"
    assert_close(lse, ref_lse, rtol=0.0, atol=atol, name="lse")
    assert_close(logprobs, ref_logq.topk(k, dim=-1).values, rtol=0.0, atol=atol, name="top-k log-probs")
    assert_close(logprobs, ref_logq.gather(-1, ids.long()), rtol=0.0, atol=atol, name="reference log-probs at ids")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("k", [1, 5, 64])
def test_matches_float64_reference(impl, transform, k):
    use_bias, temperature, softcap, scale = TRANSFORMS[transform]
    hidden, weight, bias = _inputs((N,), torch.float32, seed=k, use_bias=use_bias, scale=scale)
    out = linear_topk(hidden, weight, k, bias=bias, temperature=temperature, softcap=softcap, impl=impl)
    ref_logq, ref_lse, z_scale = _reference(hidden, weight, bias, temperature, softcap)
    assert out[3] is None
    _check_topk(out, ref_logq, ref_lse, k, VALUE_RTOL[torch.float32], z_scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_hidden_dtypes_and_targets(impl, dtype):
    """[B, T, H] hidden, bias, softcap and temperature, target ids (negative = none -> 0.0), per dtype."""
    hidden, weight, bias = _inputs((3, 13), dtype, seed=7, use_bias=True)
    gen = torch.Generator().manual_seed(8)
    targets = torch.randint(0, V, (3, 13), generator=gen)
    targets[1, 4] = -100
    targets[2, :2] = torch.tensor([0, V - 1])
    out = linear_topk(hidden, weight, 5, bias=bias, temperature=0.8, softcap=6.0, target_ids=targets, impl=impl)
    ref_logq, ref_lse, z_scale = _reference(hidden, weight, bias, 0.8, 6.0)
    _check_topk(out, ref_logq, ref_lse, 5, VALUE_RTOL[dtype], z_scale)
    ref_target = ref_logq.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref_target[1, 4] = 0.0
    assert out[3].shape == (3, 13) and out[3].dtype == torch.float32
    assert_close(out[3], ref_target, rtol=0.0, atol=VALUE_RTOL[dtype] * z_scale, name="target log-probs")


@pytest.mark.skipif("triton" not in IMPLS, reason="triton is not importable")
@pytest.mark.parametrize("k", [3, 16])
def test_triton_equals_torch_twin(k):
    """Several row blocks and vocabulary splits (the host-side merge) against a twin of several row chunks."""
    hidden, weight, bias = _inputs((N,), torch.float32, seed=11 + k, use_bias=True)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(12))
    kwargs = dict(bias=bias, temperature=0.9, softcap=8.0, target_ids=targets)
    tri = linear_topk(hidden, weight, k, impl="triton", launch=TopkLaunch(16, 128, 16, num_splits=3), **kwargs)
    twin = linear_topk(hidden, weight, k, impl="torch", chunk_bytes=5 * V * 24, **kwargs)
    for name, a, b in zip(("log-probs", "lse", "target log-probs"), tri[1:], twin[1:]):
        assert_close(a, b, rtol=2e-6, name=name)
    # ids agree wherever the log-probs are not within rounding of a neighbour (no near-ties)
    gaps = twin[1].diff(dim=-1).abs()
    clear = torch.ones_like(twin[0], dtype=torch.bool)
    clear[:, 1:] &= gaps > 1e-5
    clear[:, :-1] &= gaps > 1e-5
    assert (tri[0][clear] == twin[0][clear]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_lower_id(impl):
    """Rows with hidden = 0 have z = bias exactly on both paths: many exact ties, across tiles and splits.
    Rows with random hidden states (no ties) sit between them."""
    vocab, k = 300, 12
    bias = torch.tensor([float((v * 7) % 5) for v in range(vocab)])  # values 0..4, each ~60 times
    bias[250] = bias[17] = 9.0
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 16, generator=gen)
    hidden[[0, 2, 3, 5]] = 0.0
    weight = torch.randn(vocab, 16, generator=gen)
    launch = TopkLaunch(16, 64, 16, num_splits=2) if impl == "triton" else None
    ids, _, _, _ = linear_topk(hidden, weight, k, bias=bias, impl=impl, launch=launch)
    order = sorted(range(vocab), key=lambda v: (-bias[v].item(), v))[:k]
    assert ids[[0, 2, 3, 5]].tolist() == [order] * 4
    ref_logq, _, _ = _reference(hidden[[1, 4]], weight, bias, 1.0, None)
    assert ids[[1, 4]].tolist() == ref_logq.topk(k, dim=1).indices.tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_k_equals_a_small_vocabulary(impl):
    """k = V (not a power of two): every id once, the padding of the running list never shows."""
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(6, 16, generator=gen), torch.randn(37, 16, generator=gen)
    out = linear_topk(hidden, weight, 37, impl=impl)
    ref_logq, ref_lse, z_scale = _reference(hidden, weight, None, 1.0, None)
    _check_topk(out, ref_logq, ref_lse, 37, 2e-6, z_scale)


def test_keys_round_trip_and_order():
    z = torch.tensor([[1.5, -0.0, 0.0, -2.0, float("inf"), float("-inf"), 1e-42, -1e-42, 1.5]])
    keys = encode_keys(z)
    ids, values = decode_keys(keys)
    assert ids.tolist() == [list(range(9))]
    assert torch.equal(values, torch.where(z == 0, torch.zeros_like(z), z))  # -0.0 folded to +0.0
    order = keys.argsort(dim=1, descending=True)[0].tolist()
    assert order == [4, 0, 8, 6, 1, 2, 7, 3, 5]  # by value, ties (1.5, 1.5) and (-0.0, +0.0) by lower id


def test_no_rows():
    out = linear_topk(torch.zeros(0, 8), torch.randn(10, 8), 3, target_ids=torch.zeros(0, dtype=torch.long))
    assert out[0].shape == (0, 3) and out[1].shape == (0, 3) and out[2].shape == (0,) and out[3].shape == (0,)


def test_no_gradient_flows():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    ids, logprobs, lse, _ = linear_topk(hidden, weight, 3, impl="torch")
    assert not logprobs.requires_grad and not lse.requires_grad


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(4, 8), torch.randn(10, 8), 11), {}, "exceeds the vocabulary"),
        ((torch.randn(4, 8), torch.randn(10, 8), 0), {}, "positive integer"),
        ((torch.randn(4, 8), torch.randn(10, 9), 2), {}, "weight must be"),
        ((torch.randn(8), torch.randn(10, 8), 2), {}, "hidden must be"),
        ((torch.randn(4, 8), torch.randn(10, 8), 2), {"bias": torch.randn(9)}, "bias must be"),
        ((torch.randn(4, 8), torch.randn(10, 8), 2), {"target_ids": torch.tensor([0, 1, 2, 10])}, "outside"),
        ((torch.randn(4, 8), torch.randn(10, 8), 2), {"target_ids": torch.zeros(5, dtype=torch.long)}, "shape"),
        ((torch.randn(4, 8), torch.randn(10, 8), 2), {"temperature": 0.0}, "temperature"),
        ((torch.randn(4, 8), torch.randn(10, 8), 2), {"impl": "cuda"}, "impl must be"),
        ((torch.randn(4, 8), torch.randn(10, 8).double(), 2), {}, "float32, bfloat16"),
    ],
)
def test_bad_input_is_one_line(args, kwargs, match):
    with pytest.raises(GrpoKdError, match=match) as info:
        linear_topk(*args, **kwargs)
    assert "\n" not in str(info.value)
