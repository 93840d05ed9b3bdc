"""The teacher cache's types: what a shard holds (`CacheSpec`), a batch of scored rows (`ScoredRows`), and the
protocols every storage format satisfies (`ShardWriter`, `ShardReader`).

Formats (arrow_format.py, zarr_format.py) import this module; the dispatch that picks a format
(`teacher.py`) imports the formats; nothing here imports either, so the three never form a cycle.

What a row holds (C = completion tokens of the rollout row, k = top_k, m = num_samples):

    row               int64        the rollout row (within rollout shard J) this row scores
    group_id          int64        copied from the rollout, to check the alignment
    num_tokens        int32        C
    seq_logprob       float64      sum of the teacher's log-probs of the completion (another vocabulary: of
                                   the teacher's own tokens of the completion text and its end of turn)
    topk_ids          int32 [C, k]     teacher top-k ids, sorted by log-prob, descending        (token_level)
    topk_logprobs     f16|u16 [C, k]   their log-probs, normalised over the full vocabulary     (token_level)
                                       (u16 = bfloat16 bits, `logprob_dtype: bfloat16`)
    target_logprobs   float32 [C]      exact teacher log-prob of the sampled token              (token_level)
                                       another vocabulary: the teacher's log-prob of the bytes the   (alignment)
                                       student token covers, by the alignment rule (grpo_kd/xtok.py)
    sample_ids        int32 [C, m]     distinct ids drawn m times from the teacher ...          (m > 0)
    sample_weights    float32 [C, m]   ... with weight count/m (sum 1 per token; padding: id 0, weight 0)
    sample_logprobs   float32 [C, m]   ... and the teacher's full-vocabulary log-probs at those ids (padding:
                                       at id 0). float32, not the top-k's half precision: the sampled forward
                                       KL uses them as they are, and m is small beside k
    ref_logprobs      float32 [C]      reference model (student's initial / base) log-probs     (reference)
    xtok_bytes        int32 [C]        completion-text bytes the student token covers (eos: 0)  (alignment)
    xtok_teacher_tokens int32 [C]      teacher tokens whose log-prob the student token holds    (alignment)
    xtok_straddled    int8 [C]         1: a teacher token crosses the byte where it starts      (alignment)
    xtok_num_tokens   int32            teacher tokens scored (completion and end of turn)       (cross_tokenizer)
    xtok_num_bytes    int64            UTF-8 bytes of the completion text                       (cross_tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from grpo_kd.cache.manifest import CacheError
from grpo_kd.cache.values import describe_bad, first_bad

TEACHER_KIND = "teacher_cache"
ALIGNMENT_RULES = ("last-byte",)  # how a teacher of another vocabulary is mapped onto student tokens (xtok.py)
FORMATS = {"arrow": "arrow", "zarr": "zarr"}  # format -> file suffix


@dataclass(frozen=True)
class CacheSpec:
    """What a teacher shard holds. Stored in its manifest under "spec"."""

    format: str = "arrow"  # "arrow" | "zarr"
    top_k: int = 64
    num_samples: int = 0  # m
    logprob_dtype: str = "float16"  # "float16" | "bfloat16" (stored as uint16 bits)
    token_level: bool = True  # top-k over the student's vocabulary present (False: a teacher of another one)
    reference: bool = False  # ref_logprobs present
    cross_tokenizer: bool = False  # a teacher of another vocabulary: xtok_* row fields present
    alignment: str | None = None  # its rule onto student tokens: aligned target_logprobs and xtok_* token fields

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CacheError(f"unknown cache format {self.format!r}; expected arrow or zarr")
        if self.logprob_dtype not in ("float16", "bfloat16"):
            raise CacheError(f"unknown logprob_dtype {self.logprob_dtype!r}; expected float16 or bfloat16")
        if self.alignment is not None and (self.alignment not in ALIGNMENT_RULES or self.token_level):
            raise CacheError(f"alignment {self.alignment!r}: expected one of {', '.join(ALIGNMENT_RULES)}, for a "
                             "teacher of another vocabulary (no top-k)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheSpec":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def suffix(self) -> str:
        return FORMATS[self.format]

    @property
    def stored_logprob_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.logprob_dtype == "float16" else np.uint16)

    def token_fields(self) -> dict[str, tuple[np.dtype, int]]:
        """Token-level fields present: name -> (numpy dtype, width) with width 0 for a [C] field."""
        fields: dict[str, tuple[np.dtype, int]] = {}
        if self.token_level:
            fields["topk_ids"] = (np.dtype(np.int32), self.top_k)
            fields["topk_logprobs"] = (self.stored_logprob_dtype, self.top_k)
            fields["target_logprobs"] = (np.dtype(np.float32), 0)
            if self.num_samples > 0:
                fields["sample_ids"] = (np.dtype(np.int32), self.num_samples)
                fields["sample_weights"] = (np.dtype(np.float32), self.num_samples)
                fields["sample_logprobs"] = (np.dtype(np.float32), self.num_samples)
        if self.alignment is not None:
            fields["target_logprobs"] = (np.dtype(np.float32), 0)
            fields["xtok_bytes"] = (np.dtype(np.int32), 0)
            fields["xtok_teacher_tokens"] = (np.dtype(np.int32), 0)
            fields["xtok_straddled"] = (np.dtype(np.int8), 0)
        if self.reference:
            fields["ref_logprobs"] = (np.dtype(np.float32), 0)
        return fields

    def row_fields(self) -> dict[str, np.dtype]:
        fields = {"row": np.dtype(np.int64), "group_id": np.dtype(np.int64), "num_tokens": np.dtype(np.int32),
                  "seq_logprob": np.dtype(np.float64)}
        if self.cross_tokenizer:
            fields["xtok_num_tokens"] = np.dtype(np.int32)
            fields["xtok_num_bytes"] = np.dtype(np.int64)
        return fields


@dataclass
class ScoredRows:
    """A batch of scored rollout rows, in any order; token fields are concatenated over the rows (N = sum C)."""

    row: np.ndarray  # (R,) int64 rollout row within the shard
    group_id: np.ndarray  # (R,) int64
    num_tokens: np.ndarray  # (R,) int32 completion tokens C per row
    seq_logprob: np.ndarray  # (R,) float64
    token: dict[str, np.ndarray]  # name -> (N,) or (N, width), as in CacheSpec.token_fields()
    extra: dict[str, np.ndarray] | None = None  # xtok_num_tokens (R,), xtok_num_bytes (R,)

    def row_columns(self) -> dict[str, np.ndarray]:
        cols = {"row": self.row, "group_id": self.group_id, "num_tokens": self.num_tokens,
                "seq_logprob": self.seq_logprob}
        return {**cols, **(self.extra or {})}

    def check(self, spec: CacheSpec) -> None:
        n = int(np.sum(self.num_tokens))
        for name, (dtype, width) in spec.token_fields().items():
            array = self.token.get(name)
            want = (n, width) if width else (n,)
            if array is None or array.shape != want or array.dtype != dtype:
                got = None if array is None else (array.shape, array.dtype)
                raise CacheError(f"teacher field {name}: expected {want} {dtype}, got {got}")
        for name, dtype in spec.row_fields().items():
            array = self.row_columns().get(name)
            if array is None or array.shape != (len(self.row),):
                raise CacheError(f"teacher row field {name}: expected ({len(self.row)},) {dtype}")
        why = self.value_problem()
        if why:
            raise CacheError(f"teacher scores: {why}")

    def value_problem(self) -> str | None:
        """None when every number is sane (`grpo_kd.cache.values`: log-probs finite and <= 0, the rest finite),
        else what is wrong, naming the rollout row (and the token in it)."""
        found = first_bad(self.seq_logprob, logprobs=True)
        if found is not None:
            return describe_bad("seq_logprob", found[1], f"rollout row {int(self.row[found[0]])}")
        ends = np.cumsum(np.asarray(self.num_tokens, np.int64))
        for name, values in self.token.items():
            logprobs = name.endswith("logprobs")
            found = first_bad(stored_logprobs_as_float32(values) if name == "topk_logprobs" else values,
                              logprobs=logprobs)
            if found is not None:
                position = int(np.searchsorted(ends, found[0], side="right"))
                token = found[0] - (int(ends[position - 1]) if position else 0)
                return describe_bad(name, found[1], f"rollout row {int(self.row[position])}, token {token}")
        return None


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> numpy uint16 bits (Arrow and Zarr have no bfloat16)."""
    return t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def stored_logprobs_as_float32(stored: np.ndarray) -> np.ndarray:
    """Stored top-k log-probs (float16, or uint16 bfloat16 bits) -> float32, same shape."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


# ----------------------------------------------------------------------------------------------- the interface


class ShardWriter(Protocol):
    def add(self, scored: ScoredRows) -> None: ...
    def close(self) -> None: ...


class ShardReader(Protocol):
    spec: CacheSpec
    num_rows: int

    def rows(self) -> np.ndarray: ...  # (R,) rollout rows present, in storage order
    def row_values(self, name: str) -> np.ndarray: ...  # (R,) a row field, indexed by rollout row
    def read(self, rows: np.ndarray, names: list[str]) -> dict[str, list[np.ndarray]]: ...  # per-row arrays
    def iter_token_chunks(self, names: list[str]) -> Iterator[dict[str, np.ndarray]]: ...  # flat token arrays
