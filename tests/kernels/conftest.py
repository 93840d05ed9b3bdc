"""Kernel-test fixtures. Triton kernels run on CPU tensors through Triton's interpreter, which must be switched
on before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grpo_kd.kernels import _common  # noqa: E402

IMPLS = ["torch", "triton"] if _common.triton_available() else ["torch"]


@pytest.fixture(params=IMPLS)
def impl(request):
    """Every kernel test runs on the torch twin and, where triton imports, on the Triton kernels."""
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several row chunks in the torch twin and the backward buffer (a few rows per chunk)."""
    monkeypatch.setattr(_common, "DEFAULT_CHUNK_BYTES", 7 * 1031 * 4)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
