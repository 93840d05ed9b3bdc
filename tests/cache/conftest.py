"""Fixtures for the cache tests: the tiny models (the suite's shared `tiny_models` when there is one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_models(request, tmp_path_factory):
    """The shared `tiny_models` fixture when the suite has one, else a small build of our own
    (in $GRPO_KD_TEST_MODELS when set, so that repeated local runs reuse it)."""
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        from grpo_kd.tiny import build_tiny_models

        root = os.environ.get("GRPO_KD_TEST_MODELS") or tmp_path_factory.mktemp("tiny-models")
        return build_tiny_models(Path(root), pretrain_steps=40)
