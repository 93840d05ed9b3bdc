"""How close the student came to its teacher, on the student's own samples (on-policy, as in training).

The student samples one completion per held-out prompt; then, on exactly those tokens:

- teacher score: the teacher's mean log-prob per token of each completion, log p(y_t | x, y_<t), averaged
  over the completion (`teacher_logprob_mean`, the GRPO-KD reward, averaged over completions), pooled over all
  tokens (`teacher_logprob_per_token`), and per UTF-8 byte of completion text (`teacher_nll_per_byte`, which
  compares across tokenizers);
- forward KL(p || q) = sum_v p(v) (log p(v) - log q(v)) and reverse KL(q || p) = sum_v q(v) (log q(v) - log p(v))
  between the teacher's p and the student's q next-token distributions at every completion position, averaged
  over tokens (nats per token);
- top-1 agreement: the fraction of positions where argmax p == argmax q.

KL method (decision): *exact* over the whole vocabulary, computed in row chunks from hidden states and the two
LM heads (`kernels._common.row_chunks` sizes the chunks so that about 64 MiB of float32 logits live at once per
model); no `N x V` tensor, and no top-k approximation (the top-k `linear_sparse_kl` of training is biased by
the missing tail, which an evaluation should not inherit).

The two models are never in memory together: the student's hidden states at the completion positions and its
LM head are kept (on the CPU) when the student is unloaded, and the divergences are computed once the teacher
has produced its own. Token-level metrics need the same vocabulary; with different tokenizers the suite fails
before any sampling unless `eval.distill_cross_tokenizer=true`, in which case the teacher re-tokenizes the text
and only the sequence-level score is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from grpo_kd.evaluate.generation import Generation
from grpo_kd.evaluate.scoring import completion_hidden_states, sequence_logprobs
from grpo_kd.kernels._common import row_chunks, transform_logits
from grpo_kd.models import LMHead, lm_head


@dataclass
class StudentSide:
    """What the distill metrics need of the student once it is unloaded."""

    hidden: list[torch.Tensor]  # per sample (C_i, H_s), float32, CPU
    head: LMHead  # weight (V, H_s) and bias on CPU, in the student's dtype
    completion_ids: list[list[int]]
    prompt_ids: list[list[int]]
    texts: list[str]
    prompts: list[str]


def student_side(model, tokenizer, samples: Sequence[Generation], prompts: Sequence[str], batch_size: int) -> StudentSide:
    """Hidden states of the student at its own completion positions, and a CPU copy of its LM head."""
    hidden = completion_hidden_states(
        model, [s.prompt_ids for s in samples], [s.completion_ids for s in samples],
        pad_id=tokenizer.pad_token_id, batch_size=batch_size, description="student pass",
    )
    head = lm_head(model)
    cpu_head = LMHead(
        weight=head.weight.detach().cpu().clone(),
        bias=None if head.bias is None else head.bias.detach().cpu().clone(),
        softcap=head.softcap,
    )
    return StudentSide(
        hidden=hidden, head=cpu_head, completion_ids=[list(s.completion_ids) for s in samples],
        prompt_ids=[list(s.prompt_ids) for s in samples], texts=[s.text for s in samples], prompts=list(prompts),
    )


def _head_logprobs(hidden: torch.Tensor, head: LMHead, temperature: float = 1.0) -> torch.Tensor:
    """hidden (n, H) -> log-softmax of the transformed logits (n, V), float32; n is one row chunk.

    The product runs in the head's dtype (as in the model's own forward), the softmax in float32."""
    logits = (hidden.to(head.weight.dtype) @ head.weight.T).float()  # (n, V)
    if head.bias is not None:
        logits = logits + head.bias.float()
    return torch.log_softmax(transform_logits(logits, temperature, head.softcap), dim=-1)


def _on(head: LMHead, device: torch.device) -> LMHead:
    bias = None if head.bias is None else head.bias.to(device)
    return LMHead(weight=head.weight.to(device), bias=bias, softcap=head.softcap)


def _truncate(head: LMHead, vocab: int) -> LMHead:
    """The first `vocab` rows of a head whose weight was padded past the tokenizer (same tokenizer, other V)."""
    bias = None if head.bias is None else head.bias[:vocab]
    return LMHead(weight=head.weight[:vocab], bias=bias, softcap=head.softcap)


@torch.no_grad()
def token_divergences(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    token_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Exact per-token divergences between teacher p and student q, chunked over rows.

    student_hidden (N, H_s), teacher_hidden (N, H_t), token_ids (N,) on one device. Returns per-token (N,)
    tensors: forward_kl KL(p||q), reverse_kl KL(q||p), top1_agree (0/1), teacher_logprob log p(y),
    student_logprob log q(y).
    """
    vocab = min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:  # one head padded past the tokenizer
        student_head, teacher_head = _truncate(student_head, vocab), _truncate(teacher_head, vocab)
    out = {key: torch.empty(len(token_ids)) for key in
           ("forward_kl", "reverse_kl", "top1_agree", "teacher_logprob", "student_logprob")}
    for rows in row_chunks(len(token_ids), vocab):
        log_q = _head_logprobs(student_hidden[rows], student_head)  # (n, V)
        log_p = _head_logprobs(teacher_hidden[rows], teacher_head)  # (n, V)
        ids = token_ids[rows].to(log_p.device).unsqueeze(1)  # (n, 1)
        out["forward_kl"][rows] = (log_p.exp() * (log_p - log_q)).sum(-1).cpu()
        out["reverse_kl"][rows] = (log_q.exp() * (log_q - log_p)).sum(-1).cpu()
        out["top1_agree"][rows] = (log_p.argmax(-1) == log_q.argmax(-1)).float().cpu()
        out["teacher_logprob"][rows] = log_p.gather(1, ids).squeeze(1).cpu()
        out["student_logprob"][rows] = log_q.gather(1, ids).squeeze(1).cpu()
    return out


def _sequence_summary(per_sequence: list[torch.Tensor], texts: Sequence[str]) -> dict[str, float]:
    """Teacher score of each completion: mean per completion, pooled per token, NLL per byte."""
    nonempty = [lp for lp in per_sequence if len(lp)]
    total = sum(float(lp.double().sum()) for lp in per_sequence)
    tokens = sum(len(lp) for lp in per_sequence)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "teacher_logprob_mean": sum(float(lp.mean()) for lp in nonempty) / max(len(nonempty), 1),
        "teacher_logprob_per_token": total / max(tokens, 1),
        "teacher_nll_per_byte": -total / num_bytes if num_bytes else float("nan"),
        "num_tokens": tokens,
    }


@torch.no_grad()
def distill_metrics(student: StudentSide, teacher_model, *, batch_size: int = 8, pad_id: int,
                    teacher_prompt_ids: Sequence[Sequence[int]] | None = None) -> dict:
    """Teacher score, exact forward / reverse KL and top-1 agreement on the student's samples (same vocabulary).
    `teacher_prompt_ids`: the prompts the teacher is conditioned on, when not the student's (a privileged
    self-teacher sees its privileged information too); the completions are the same tokens."""
    teacher_hidden = completion_hidden_states(
        teacher_model, teacher_prompt_ids or student.prompt_ids, student.completion_ids, pad_id=pad_id,
        batch_size=batch_size, description="teacher pass",
    )
    teacher_head = lm_head(teacher_model)
    device = teacher_head.weight.device  # the last GPU of a teacher spread over several
    per_token = token_divergences(
        torch.cat(student.hidden).to(device),
        _on(student.head, device),
        torch.cat(teacher_hidden).to(device),
        teacher_head,
        torch.tensor([t for ids in student.completion_ids for t in ids], dtype=torch.long),
    )
    lengths = [len(ids) for ids in student.completion_ids]
    summary = _sequence_summary(list(torch.split(per_token["teacher_logprob"], lengths)), student.texts)
    summary.update(
        num_samples=len(lengths),
        student_logprob_per_token=float(per_token["student_logprob"].mean()),
        forward_kl=float(per_token["forward_kl"].mean()),
        reverse_kl=float(per_token["reverse_kl"].mean()),
        top1_agreement=float(per_token["top1_agree"].mean()),
        kl_method="exact over the vocabulary (row-chunked)",
    )
    return summary


@torch.no_grad()
def cross_tokenizer_score(student: StudentSide, teacher_model, teacher_tokenizer, *, batch_size: int = 8) -> dict:
    """The teacher's score of the completion *text*, re-tokenized by the teacher (no token-level metrics)."""
    sequences, completion_lengths = [], []
    for prompt, text in zip(student.prompts, student.texts):
        prompt_ids = teacher_tokenizer(prompt, add_special_tokens=True)["input_ids"]
        completion = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + completion)
        completion_lengths.append(len(completion))
    logprobs = sequence_logprobs(
        teacher_model, sequences, pad_id=teacher_tokenizer.pad_token_id, batch_size=batch_size,
        description="teacher pass",
    )
    per_sequence = [lp[len(lp) - n :] if n else lp[:0] for lp, n in zip(logprobs, completion_lengths)]
    summary = _sequence_summary(per_sequence, student.texts)
    summary.update(num_samples=len(sequences), kl_method="none: the vocabularies differ (teacher re-tokenizes the text)")
    return summary
