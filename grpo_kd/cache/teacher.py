"""The teacher cache: what a teacher said about every rollout token, one shard per rollout shard, two formats.

    iter_0001/teacher/part-0000J.arrow   (or part-0000J.zarr/)   scores of rollout shard J, one row per completion
    iter_0001/teacher/part-0000J.manifest.json                   spec, fingerprints, counts, sha256 (manifest.py)

What a row holds (C = completion tokens of the rollout row, k = top_k, m = num_samples):

    row               int64        the rollout row (within rollout shard J) this row scores
    group_id          int64        copied from the rollout, to check the alignment
    num_tokens        int32        C
    seq_logprob       float64      sum of the teacher's log-probs of the completion (in cross-tokenizer mode:
                                   over the teacher's own re-tokenisation of the completion text)
    topk_ids          int32 [C, k]     teacher top-k ids, sorted by log-prob, descending        (token_level)
    topk_logprobs     f16|u16 [C, k]   their log-probs, normalised over the full vocabulary     (token_level)
                                       (u16 = bfloat16 bits, `logprob_dtype: bfloat16`)
    target_logprobs   float32 [C]      exact teacher log-prob of the sampled token              (token_level)
    sample_ids        int32 [C, m]     distinct ids drawn m times from the teacher ...          (m > 0)
    sample_weights    float32 [C, m]   ... with weight count/m (sum 1 per token; padding: id 0, weight 0)
    sample_logprobs   float32 [C, m]   ... and the teacher's full-vocabulary log-probs at those ids (padding:
                                       at id 0). float32, not the top-k's half precision: the sampled forward
                                       KL uses them as they are, and m is small beside k
    ref_logprobs      float32 [C]      reference model (student's initial / base) log-probs     (reference)
    xtok_num_tokens   int32            teacher tokens of the re-tokenised completion            (cross_tokenizer)
    xtok_num_bytes    int64            UTF-8 bytes of the completion text                       (cross_tokenizer)

Key design choices:
- Rows are stored in the order the teacher pass produced them (sorted by length, batched by a token budget),
  each with its rollout `row`; readers index by `row`. This lets the writer stream: it never holds a shard in
  memory, and the Arrow file is a sequence of record batches, one per teacher batch.
- One interface (`open_shard_writer`, `open_shard_reader`, `ScoredRows`) over two formats: Arrow IPC
  (`arrow_format.py`, default, uncompressed, memory-mapped, zero-copy row views) and Zarr v3 (`zarr_format.py`,
  Blosc-zstd compressed, chunked by tokens, for shared or object storage).
- `TeacherShardSink` makes a shard atomic: data to `*.tmp-<pid>`, rename, then the manifest (see manifest.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from grpo_kd.cache.manifest import (
    CacheError,
    checksum,
    fsync_dir,
    list_shard_manifests,
    remove_shard,
    shard_data_path,
    size_bytes,
    write_shard_manifest,
)
from grpo_kd.fsutil import tmp_path_for

TEACHER_KIND = "teacher_cache"
FORMATS = {"arrow": "arrow", "zarr": "zarr"}  # format -> file suffix


@dataclass(frozen=True)
class CacheSpec:
    """What a teacher shard holds. Stored in its manifest under "spec"."""

    format: str = "arrow"  # "arrow" | "zarr"
    top_k: int = 64
    num_samples: int = 0  # m
    logprob_dtype: str = "float16"  # "float16" | "bfloat16" (stored as uint16 bits)
    token_level: bool = True  # False: a teacher with another vocabulary; only sequence fields
    reference: bool = False  # ref_logprobs present
    cross_tokenizer: bool = False  # xtok_* fields present

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CacheError(f"unknown cache format {self.format!r}; expected arrow or zarr")
        if self.logprob_dtype not in ("float16", "bfloat16"):
            raise CacheError(f"unknown logprob_dtype {self.logprob_dtype!r}; expected float16 or bfloat16")
        if self.token_level and self.top_k < 1:
            raise CacheError(f"teacher.top_k must be at least 1, got {self.top_k}")

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


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> numpy uint16 bits (Arrow and Zarr have no bfloat16)."""
    return t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def logprobs_to_float(stored: np.ndarray) -> torch.Tensor:
    """Stored top-k log-probs (float16, or uint16 bfloat16 bits) -> float32 tensor."""
    if stored.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(stored)).float()


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
    def iter_token_chunks(self, names: list[str]) -> Any: ...  # yields dicts of flat token arrays


def open_shard_writer(path: Path, spec: CacheSpec, *, total_rows: int, total_tokens: int) -> ShardWriter:
    if spec.format == "arrow":
        from grpo_kd.cache.arrow_format import ArrowShardWriter

        return ArrowShardWriter(path, spec)
    from grpo_kd.cache.zarr_format import ZarrShardWriter

    return ZarrShardWriter(path, spec, total_rows=total_rows, total_tokens=total_tokens)


def open_shard_reader(path: Path, spec: CacheSpec) -> ShardReader:
    if spec.format == "arrow":
        from grpo_kd.cache.arrow_format import ArrowShardReader

        return ArrowShardReader(path, spec)
    from grpo_kd.cache.zarr_format import ZarrShardReader

    return ZarrShardReader(path, spec)


# ----------------------------------------------------------------------------------------------- atomic shard


class TeacherShardSink:
    """Write teacher shard `shard` of `directory` atomically.

        with TeacherShardSink(dir, 0, spec, total_rows=R, total_tokens=N, manifest={...}) as sink:
            sink.add(scored_rows)          # any number of times, rows in any order
        # on a clean exit: data renamed into place, then part-00000.manifest.json written

    Entering removes whatever an earlier (killed) attempt left of this shard; leaving with an exception removes
    the temporary data. `manifest` holds the caller's part (fingerprints, the rollout shard scored, params).
    """

    def __init__(self, directory: Path, shard: int, spec: CacheSpec, *, total_rows: int, total_tokens: int,
                 manifest: dict[str, Any]):
        self.directory = Path(directory)
        self.shard = shard
        self.spec = spec
        self.total_rows = total_rows
        self.total_tokens = total_tokens
        self.manifest = manifest
        self.path = shard_data_path(self.directory, shard, spec.suffix)
        self.tmp = tmp_path_for(self.path)
        self.rows_written = 0
        self.tokens_written = 0
        self._writer: ShardWriter | None = None

    def __enter__(self) -> "TeacherShardSink":
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_shard(self.directory, self.shard)
        self._writer = open_shard_writer(self.tmp, self.spec, total_rows=self.total_rows,
                                         total_tokens=self.total_tokens)
        return self

    def add(self, scored: ScoredRows) -> None:
        scored.check(self.spec)
        assert self._writer is not None
        self._writer.add(scored)
        self.rows_written += len(scored.row)
        self.tokens_written += int(np.sum(scored.num_tokens))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            remove_shard_tmp(self.tmp)

    def _finish(self) -> None:
        assert self._writer is not None
        self._writer.close()
        if (self.rows_written, self.tokens_written) != (self.total_rows, self.total_tokens):
            raise CacheError(f"teacher shard {self.shard}: wrote {self.rows_written} rows / {self.tokens_written} "
                             f"tokens but {self.total_rows} / {self.total_tokens} were expected")
        if self.tmp.is_file():
            with open(self.tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)
        fsync_dir(self.directory)
        manifest = {
            "kind": TEACHER_KIND,
            "format": self.spec.format,
            "file": self.path.name,
            "sha256": checksum(self.path),
            "bytes": size_bytes(self.path),
            "rows": self.rows_written,
            "tokens": self.tokens_written,
            "spec": asdict(self.spec),
            **self.manifest,
        }
        write_shard_manifest(self.directory, self.shard, manifest)


def remove_shard_tmp(tmp: Path) -> None:
    if tmp.is_dir():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


# ----------------------------------------------------------------------------------------------- the directory


@dataclass
class TeacherShard:
    shard: int
    path: Path
    manifest: dict[str, Any]
    spec: CacheSpec
    reader: ShardReader


def open_teacher_shards(directory: str | Path) -> list[TeacherShard]:
    """Every finished teacher shard of `directory`, opened for reading (memory-mapped for Arrow)."""
    directory = Path(directory)
    manifests = {j: m for j, m in list_shard_manifests(directory).items() if m.get("kind") == TEACHER_KIND}
    if not manifests:
        raise CacheError(f"no finished teacher-cache shards in {directory} (run `grpo-kd cache-teacher` first)")
    shards = []
    for j in sorted(manifests):
        spec = CacheSpec.from_dict(manifests[j]["spec"])
        path = shard_data_path(directory, j, spec.suffix)
        if not path.exists():
            raise CacheError(f"teacher shard {path} is listed by its manifest but missing")
        shards.append(TeacherShard(j, path, manifests[j], spec, open_shard_reader(path, spec)))
    return shards
