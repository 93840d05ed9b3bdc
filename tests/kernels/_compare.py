"""One comparison helper for kernel tests: prints max/mean error and the first mismatching indices."""

from __future__ import annotations

import torch

# Tolerances relative to the largest magnitude of the expected tensor, per input dtype. fp32: accumulation-order
# noise only. bf16: gradients are returned in bf16 (8 mantissa bits) and dx is rounded to bf16 before the two
# products, so errors of a few bf16 ulps of the largest entry are expected.
TOLERANCES = {
    torch.float32: {"value": 2e-5, "grad": 5e-5},
    torch.bfloat16: {"value": 2e-5, "grad": 2e-2},
}


def assert_close(actual, expected, *, rtol: float, name: str = "tensor", atol: float = 0.0) -> None:
    """Fail when |actual - expected| > atol + rtol * max|expected| anywhere; say where and by how much."""
    assert actual is not None, f"{name}: got None"
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    where = (~torch.isfinite(actual)).nonzero()[:5].tolist()
    assert not where, f"{name}: non-finite values at {where}"
    if actual.numel() == 0:
        return
    scale = expected.abs().max().item()
    bound = atol + rtol * max(scale, 1e-12)
    err = (actual - expected).abs()
    bad = (err > bound).nonzero()
    message = (
        f"{name}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}, bound {bound:.3e} "
        f"(scale {scale:.3e}); first mismatches at {bad[:5].tolist()}"
    )
    print(message)
    assert bad.numel() == 0, message
