"""Tiny teacher and student models for the tests and the demo, built in seconds on a CPU from local text.

A tokenizer is trained on the text, then a teacher and a smaller student of a real architecture are written as
ordinary `save_pretrained` directories with the tokenizer beside them: by default Llama (LlamaForCausalLM with a
byte-level BPE), or with `arch=` another family of the experiments (`grpo_kd.tiny_families`: Mistral, Gemma-3,
GPT-2/GPT-SW3, each with its own tokenizer type, special tokens, chat template and LM-head layout). Key design choice: nothing here is special to tiny models downstream; the directories
load through `grpo_kd.models.load_causal_lm` exactly like a 7B checkpoint, so the tests exercise the real path.
The teacher is bigger and pre-trained longer than the student, so it is clearly the better model; the held-out
perplexities of both are written to `OUT/build.json`.

    paths = build_tiny_models("runs/tiny-models")                  # built-in corpus, deterministic in `seed`
    gemma = build_tiny_models("runs/tiny-gemma3", arch="gemma3")    # the Gemma-3 family in miniature
    paths.teacher, paths.student, paths.tokenizer                  # three directories
    other = build_tiny_student("runs/other-vocab", vocab_size=384)  # a student with a different vocabulary
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_path, atomic_write_json
from grpo_kd.tiny_families import (  # noqa: F401 (CHAT_TEMPLATE, SPECIAL_TOKENS, *_ARCH: the Llama family's)
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    STUDENT_ARCH,
    TEACHER_ARCH,
    TinyArch,
    family,
    make_family_model,
    train_family_tokenizer,
)

log = logging.getLogger(__name__)

BUILTIN_CORPUS = Path(__file__).resolve().parent / "assets" / "builtin_corpus.txt"


class TinyModels(NamedTuple):
    teacher: Path  # save_pretrained directory with the tokenizer beside the weights
    student: Path
    tokenizer: Path


MAX_POSITIONS = 512


# ---------------------------------------------------------------------------------------------- text


def corpus_texts(corpus: list[Path] | None = None) -> list[str]:
    """Texts of the corpus files in file order: CoNLL-U `# text = ` lines, the "text" field of JSONL or Parquet
    records (which may span lines), non-empty lines of any other file."""
    from grpo_kd.data import load_texts

    files = [BUILTIN_CORPUS] if not corpus else [Path(p) for p in corpus]
    texts: list[str] = []
    for file in files:
        texts.extend(load_texts(str(file)))  # the format from the suffix: CoNLL-U, JSONL / Parquet "text", lines
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer as an HF fast tokenizer, with bos/eos/pad/unk, bos added, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 16:
        raise GrpoKdError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least 288)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one id stream, each `<s> ... </s>`: (N,) int64."""
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping blocks of `seq_len` tokens: (num_blocks, seq_len)."""
    count = len(stream) // seq_len
    if count == 0:
        raise GrpoKdError(f"the corpus is too short: {len(stream)} tokens, fewer than one block of {seq_len}")
    return stream[: count * seq_len].view(count, seq_len)


# ---------------------------------------------------------------------------------------------- models


def _make_llama(arch: TinyArch, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=arch.tie_embeddings,
        **({} if arch.head_dim is None else {"head_dim": arch.head_dim}),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretrain(model, blocks: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Next-token training on random blocks (B, T) with AdamW and a cosine decay; returns the last loss."""
    if steps <= 0:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = torch.randint(len(blocks), (batch_size,), generator=generator)
        batch = blocks[rows]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


@contextlib.contextmanager
def _torch_threads(count: int):
    """Tiny matrices train fastest on one thread; more oversubscribe a shared CPU (10x slower measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """exp of the mean next-token NLL over the blocks (B, T)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]  # (b, T)
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.numel() - len(batch)
        total += float(loss) * tokens
        count += tokens
    return math.exp(total / count)


def _save_dir(path: Path, *objects) -> None:
    """save_pretrained each object into a temporary directory, then rename it over `path`."""
    with atomic_path(path) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)


# ---------------------------------------------------------------------------------------------- builds


@dataclass(frozen=True)
class _BuildParams:
    corpus: list[str]
    vocab_size: int
    pretrain_steps: int
    student_pretrain_steps: int
    seq_len: int
    batch_size: int
    seed: int
    teacher_arch: dict
    student_arch: dict


def _arch_params(arch: TinyArch) -> dict:
    """The arch as build.json records it; an unset head_dim is left out, so older builds stay valid."""
    return {k: v for k, v in asdict(arch).items() if not (k == "head_dim" and v is None)}


def _split_texts(texts: list[str], seed: int, heldout_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    held = set(random.Random(seed).sample(range(len(texts)), max(1, int(heldout_fraction * len(texts)))))
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def build_tiny_models(
    out_dir: str | Path,
    corpus: list[Path] | None = None,
    *,
    vocab_size: int = 1024,
    pretrain_steps: int = 200,
    student_pretrain_steps: int | None = None,
    seq_len: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    teacher_arch: TinyArch | None = None,
    student_arch: TinyArch | None = None,
    arch: str = "llama",
) -> TinyModels:
    """Write OUT/{tokenizer,teacher,student} and OUT/build.json; deterministic given the arguments.

    `arch` is the family (`grpo_kd.tiny_families.FAMILIES`); `pretrain_steps` trains the teacher; the student
    gets `student_pretrain_steps` (default a quarter of the teacher's). A finished build with the same arguments
    is reused unless `force`. Other shapes than the family's tiny defaults (`teacher_arch`, `student_arch`)
    serve benchmarks at a larger scale.
    """
    out = Path(out_dir)
    fam = family(arch)
    teacher_arch, student_arch = teacher_arch or fam.teacher_arch, student_arch or fam.student_arch
    student_steps = pretrain_steps // 4 if student_pretrain_steps is None else student_pretrain_steps
    params = asdict(_BuildParams(
        [str(Path(p).resolve()) for p in corpus or []], vocab_size, pretrain_steps, student_steps,
        seq_len, batch_size, seed, _arch_params(teacher_arch), _arch_params(student_arch),
    ))  # fmt: skip
    if arch != "llama":  # a Llama build's build.json stays what it was before the families
        params["family"] = arch
    paths = TinyModels(teacher=out / "teacher", student=out / "student", tokenizer=out / "tokenizer")
    report_path = out / "build.json"
    if not force and report_path.is_file() and json.loads(report_path.read_text())["params"] == params:
        log.info("tiny models in %s are already built with these settings", out)
        return paths
    report_path.unlink(missing_ok=True)
    started = time.perf_counter()
    train_texts, heldout_texts = _split_texts(corpus_texts(corpus), seed)
    tokenizer = _train_tokenizer(arch, train_texts, vocab_size, out)
    train_blocks = _blocks(_token_stream(tokenizer, train_texts), seq_len)  # (N, T)
    heldout_blocks = _blocks(_token_stream(tokenizer, heldout_texts), seq_len)  # (M, T)
    report: dict = {"params": params, "vocab_size": len(tokenizer), "train_tokens": train_blocks.numel()}
    _save_dir(paths.tokenizer, tokenizer)
    for role, shape, steps, lr in (("teacher", teacher_arch, pretrain_steps, 3e-3), ("student", student_arch, student_steps, 3e-3)):
        t0 = time.perf_counter()
        model = _make_model(arch, shape, tokenizer, seed + (1 if role == "student" else 0))
        with _torch_threads(1):
            last_loss = pretrain(model, train_blocks, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
            ppl = perplexity(model, heldout_blocks)
        _save_dir(getattr(paths, role), model, tokenizer)
        report[role] = {
            "arch": _arch_params(shape),
            "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain_steps": steps,
            "last_train_loss": last_loss,
            "heldout_perplexity": ppl,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.info("tiny %s: %d steps, held-out perplexity %.2f", role, steps, ppl)
    shutil.rmtree(out / _SPM_WORK, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(report_path, report)
    return paths


_SPM_WORK = "sentencepiece.tmp"  # where the GPT-SW3 family's SentencePiece model is trained, removed after the build


def _train_tokenizer(arch: str, texts: list[str], vocab_size: int, out: Path):
    if arch == "llama":
        return train_tokenizer(texts, vocab_size)
    return train_family_tokenizer(arch, texts, vocab_size, out / _SPM_WORK)


def _make_model(arch: str, shape: TinyArch, tokenizer, seed: int):
    if arch == "llama":
        return _make_llama(shape, tokenizer, seed)
    return make_family_model(arch, shape, tokenizer, seed, MAX_POSITIONS)


def build_tiny_student(
    out_dir: str | Path,
    corpus: list[Path] | None = None,
    *,
    vocab_size: int = 512,
    pretrain_steps: int = 0,
    seq_len: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> Path:
    """A student with its own tokenizer of `vocab_size` (a different vocabulary from a `build_tiny_models` pair)."""
    out = Path(out_dir)
    train_texts, _ = _split_texts(corpus_texts(corpus), seed)
    tokenizer = train_tokenizer(train_texts, vocab_size)
    model = _make_llama(STUDENT_ARCH, tokenizer, seed + 1)
    if pretrain_steps > 0:
        blocks = _blocks(_token_stream(tokenizer, train_texts), seq_len)
        with _torch_threads(1):
            pretrain(model, blocks, steps=pretrain_steps, batch_size=batch_size, lr=3e-3, seed=seed)
    _save_dir(out, model, tokenizer)
    return out
