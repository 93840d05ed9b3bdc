"""What a teacher with another vocabulary can serve, refused before any phase runs.

    check_teacher_vocabulary(cfg)     # preflight.check_inputs calls it: `grpo-kd run`, `chain submit`, every phase

A teacher with another vocabulary gives, per student token, its log-prob of that token's bytes (the aligned
`target_logprobs`, grpo_kd/xtok.py), so every reward runs with it: the teacher log-likelihood, the MiniLLM-style
log p_T - log q, PPO's per-token rewards (GRPO and PPO with either reward, self-distillation). What it cannot give
is its distribution over the student's tokens at each position (a top-k, or samples, over the student's ids):
docs/cache.md "A teacher with another tokenizer" says why no projection of its own top-k is offered instead.
Key design choice: the rules are one pure function of the config (`foreign_teacher_refusal`), so that they can
join `grpo_kd.config.rules.check()`; only the question "is the teacher foreign?" needs the two tokenizers, and
they are loaded only when a rule could refuse.
"""

from __future__ import annotations

from grpo_kd.cache.manifest import describe_vocab
from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError


# RULES for a teacher with another vocabulary (for grpo_kd/config/rules.py's check(), given whether the teacher's
# vocabulary is the student's):
#   1. an algorithm whose loss reads the teacher's distribution over the student's tokens needs one vocabulary:
#      those that read `loss.teacher_kl` (minillm's single-step KL, privileged's token-level KL; the same set as
#      the algorithms' NEEDS_TOKEN_LEVEL, tests/train/test_teacher_vocab.py);
#   2. teacher-mixed sampling (rollout.teacher_mix_alpha > 0) mixes two next-token distributions: one vocabulary.
def foreign_teacher_refusal(cfg: Config) -> str | None:
    """Why this run cannot have a teacher with another vocabulary, or None when it can."""
    if "teacher_kl" in cfg.loss.sections:
        return (f"loss.algorithm={cfg.loss.algorithm} reads the teacher's next-token distribution over the student's "
                "tokens (its top-k), which a teacher with another vocabulary cannot give (its log-probs are aligned "
                "onto the sampled tokens only); use loss.algorithm=grpo or ppo (loss.reward.kind=minillm gives the "
                "per-token log p_T - log q from the aligned values) or a teacher with the student's vocabulary")
    if cfg.rollout.teacher_mix_alpha > 0:
        return (f"rollout.teacher_mix_alpha={cfg.rollout.teacher_mix_alpha} mixes the teacher's and the student's "
                "next-token distributions, which needs one vocabulary; set rollout.teacher_mix_alpha=0 with a "
                "teacher of another vocabulary")
    return None


def foreign_teacher_problem(cfg: Config, student_fp: dict, teacher_fp: dict) -> str | None:
    """The line refusing this run for these two tokenizer fingerprints (`grpo_kd.models.tokenizer_fingerprint`),
    or None: one vocabulary, or nothing a teacher with another one cannot serve."""
    from grpo_kd.models import same_vocabulary

    refusal = None if same_vocabulary(student_fp, teacher_fp) else foreign_teacher_refusal(cfg)
    if refusal is None:
        return None
    return (f"the teacher {cfg.teacher.path} has another vocabulary ({describe_vocab(teacher_fp)}; the student "
            f"{describe_vocab(student_fp)}): {refusal}")


def check_teacher_vocabulary(cfg: Config, student_fp: dict | None = None) -> None:
    """Refuse, in one line, a run that a teacher with another vocabulary cannot serve (see the rules above);
    `student_fp`: the student's tokenizer fingerprint, when the caller has it already."""
    if cfg.teacher.kind != "model" or foreign_teacher_refusal(cfg) is None:
        return  # a self-teacher (the student's vocabulary), or nothing to refuse: no tokenizer is loaded
    from grpo_kd.models import load_tokenizer, tokenizer_fingerprint

    if student_fp is None:
        student_fp = tokenizer_fingerprint(load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                                                          trust_remote_code=cfg.model.trust_remote_code))
    teacher_fp = tokenizer_fingerprint(load_tokenizer(cfg.teacher.path,
                                                      trust_remote_code=cfg.teacher.trust_remote_code))
    problem = foreign_teacher_problem(cfg, student_fp, teacher_fp)
    if problem:
        raise GrpoKdError(problem)
