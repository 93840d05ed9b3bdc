"""`grpo-kd tiny-models`: build the tiny teacher and student used by the tests and the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import setup_logging
from grpo_kd.errors import GrpoKdError


def tiny_models(
    out: Path = typer.Argument(
        ..., help="Output directory; gets tokenizer/, teacher/, student/, build.json, prompts.txt and heldout.txt."
    ),
    corpus: Optional[list[Path]] = typer.Option(
        None, "--corpus", help="Text, CoNLL-U, or JSONL/Parquet with a \"text\" field (repeatable); default: the built-in corpus."
    ),
    pretrain_steps: int = typer.Option(200, min=0, help="Teacher pre-training steps (0: random weights)."),
    student_pretrain_steps: Optional[int] = typer.Option(
        None, min=0, help="Student pre-training steps; default a quarter of the teacher's."
    ),
    vocab_size: int = typer.Option(1024, min=288, help="Tokenizer vocabulary size (trained pieces and specials)."),
    arch: str = typer.Option(
        "llama", "--arch", help="Model family: llama (byte-level BPE), mistral, gemma3 (Gemma-3 -it, multimodal "
        "class) or gpt2 (GPT-SW3); see grpo_kd/tiny_families.py."
    ),
    other_vocab_size: int = typer.Option(
        0, min=0, help="Also write OUT/student-other-vocab/, a student with a tokenizer of this size (0: none)."
    ),
    head_dim: Optional[int] = typer.Option(
        None, min=8, help="Attention head size of both models (default hidden/heads: 24 and 12); vLLM's CPU "
        "attention serves 32, 64, 80, 96, 112, 128, ..."
    ),
    seed: int = typer.Option(0, help="Seed of the tokenizer split, the weights and the batches."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if OUT holds a build with these settings."),
) -> None:
    """Train a tokenizer on local text and write a tiny teacher and student of one model family (default Llama).

    Also splits the text's distinct lines into OUT/prompts.txt and OUT/heldout.txt (every tenth line), the data
    that configs/tiny.yaml and the demo use."""
    from dataclasses import replace

    from grpo_kd.demo import write_demo_data
    from grpo_kd.tiny import build_tiny_models, build_tiny_student
    from grpo_kd.tiny_families import family

    setup_logging()
    fam = family(arch)  # an unknown family: one line naming the known ones
    for file in corpus or []:
        if not file.is_file():
            raise GrpoKdError(f"corpus file not found: {file}")
    paths = build_tiny_models(
        out, corpus, vocab_size=vocab_size, pretrain_steps=pretrain_steps,
        student_pretrain_steps=student_pretrain_steps, seed=seed, force=force, arch=arch,
        teacher_arch=None if head_dim is None else replace(fam.teacher_arch, head_dim=head_dim),
        student_arch=None if head_dim is None else replace(fam.student_arch, head_dim=head_dim),
    )  # fmt: skip
    report = json.loads((out / "build.json").read_text(encoding="utf-8"))
    for role in ("teacher", "student"):
        info = report[role]
        typer.echo(
            f"{role}: {getattr(paths, role)}  {info['parameters']:,} parameters, {info['pretrain_steps']} steps, "
            f"held-out perplexity {info['heldout_perplexity']:.2f}"
        )
    if other_vocab_size:
        if other_vocab_size == vocab_size:
            raise GrpoKdError("--other-vocab-size must differ from --vocab-size")
        other = build_tiny_student(out / "student-other-vocab", corpus, vocab_size=other_vocab_size, seed=seed)
        typer.echo(f"student with a {other_vocab_size}-token vocabulary: {other}")
    typer.echo(f"tokenizer: {paths.tokenizer}  ({report['vocab_size']} tokens); built in {report['seconds']} s")
    data = write_demo_data(out, corpus)
    typer.echo(f"prompts: {data.prompts}  held-out: {data.heldout}")


def register(app: typer.Typer) -> None:
    app.command("tiny-models")(tiny_models)
