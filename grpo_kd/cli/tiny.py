"""`grpo-kd tiny-models`: build the tiny teacher and student used by the tests and the demo."""

from __future__ import annotations

import typer

from grpo_kd.cli._common import not_available


def tiny_models() -> None:
    """Train a byte-level BPE tokenizer on local text and write a tiny teacher and student."""
    not_available("tiny-models", issue=2)


def register(app: typer.Typer) -> None:
    app.command("tiny-models")(tiny_models)
