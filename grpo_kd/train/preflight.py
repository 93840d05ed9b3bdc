"""What the phases need from outside the config, checked before any of them does work.

    check_inputs(cfg, ["rollout", "cache-teacher", "update"])   # `grpo-kd run`, before the first phase
    check_inputs(cfg, ["cache-teacher"])                         # one phase, before it loads a model

Key design choice: every problem that is visible in the config or the files it names is found here, when work
starts, not by the phase that first touches it. `grpo-kd run` checks what all three phases need, so a missing
teacher or a vocabulary mismatch is refused before the rollout has spent its GPU hours, and each phase checks
its own part again (it may run alone, as a SLURM job). The checks are cheap: the config's rules
(`grpo_kd.config.rules`), the model directories (config.json and safetensors weights, without loading them),
the prompt and pre-training text (read and decoded: one line naming the file and line of a byte that is not
UTF-8) and the two tokenizers, whose vocabularies decide whether the teacher can be cached token by token.
"""

from __future__ import annotations

from typing import Iterable

from grpo_kd.config import Config, check
from grpo_kd.data import detect_format, load_texts, prompts_from_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.models import check_model_source, load_tokenizer, same_vocabulary, tokenizer_fingerprint
from grpo_kd.paths import PHASES
from grpo_kd.train.teacher_vocab import check_teacher_vocabulary, foreign_teacher_problem


def check_inputs(cfg: Config, phases: Iterable[str] = PHASES) -> None:
    """Raise one `GrpoKdError` line for the first problem the `phases` of `cfg` would meet; see the module doc."""
    phases = set(phases)
    check(cfg)
    check_model_source(cfg.model.path, "student", verify=False)  # the loader checks the checksums, once
    student_tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    mixed = "rollout" in phases and cfg.rollout.teacher_mix_alpha > 0
    if cfg.teacher.kind == "model" and ("cache-teacher" in phases or mixed):
        check_model_source(cfg.teacher.path, "teacher", verify=False)
        teacher_tok = load_tokenizer(cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
        check_vocabularies(cfg, tokenizer_fingerprint(student_tok), tokenizer_fingerprint(teacher_tok))
    else:
        fingerprint = tokenizer_fingerprint(student_tok)
        check_vocabularies(cfg, fingerprint, fingerprint)
        check_teacher_vocabulary(cfg, fingerprint)  # the update and the rollout refuse what it cannot serve too
    check_data(cfg, phases)


def check_data(cfg: Config, phases: Iterable[str] = PHASES) -> None:
    """The prompts (rollout) and the pre-training text (update, with L_PT) read and decoded as the phases read them."""
    if "rollout" in phases:
        _check_prompts(cfg)
    if "update" in phases and cfg.loss.pt.weight > 0:
        load_texts(cfg.data.pretrain_text, field=cfg.data.text_field)


def data_sources(cfg: Config) -> list[tuple[str, str]]:
    """(key, source) of the data files the phases read."""
    pretrain = [("data.pretrain_text", cfg.data.pretrain_text)] if cfg.loss.pt.weight > 0 else []
    return [("data.prompts", cfg.data.prompts)] + pretrain


def _check_prompts(cfg: Config) -> None:
    """The prompts are set, exist and decode (a local file is read whole; a hub dataset is left to the rollout)."""
    if cfg.data.prompts and detect_format(cfg.data.prompts, cfg.data.format) == "hf":
        return
    prompts_from_config(cfg.data)  # refuses an unset data.prompts, reads and decodes the file


def check_vocabularies(cfg: Config, student_fp: dict, teacher_fp: dict) -> None:
    """From the two tokenizer fingerprints (`grpo_kd.models.tokenizer_fingerprint`): a teacher with another
    vocabulary serves what `teacher_vocab.foreign_teacher_refusal` allows (no top-k loss, no sampling mixed with
    it); top-k and the teacher samples must fit in the teacher's vocabulary. The rollout and the teacher pass
    call it too, with the fingerprints they record."""
    problem = foreign_teacher_problem(cfg, student_fp, teacher_fp)
    if problem:
        raise GrpoKdError(problem)
    same = same_vocabulary(student_fp, teacher_fp)
    vocab = int(teacher_fp.get("vocab_size") or 0)
    if same and cfg.teacher.top_k > vocab:
        raise GrpoKdError(f"teacher.top_k={cfg.teacher.top_k} is larger than the teacher's vocabulary ({vocab} "
                          "tokens); set teacher.top_k to at most that")
    if same and cfg.teacher.num_samples > vocab:
        raise GrpoKdError(f"teacher.num_samples={cfg.teacher.num_samples} is larger than the teacher's vocabulary "
                          f"({vocab} tokens)")
