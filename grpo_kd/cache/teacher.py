"""The teacher cache: what a teacher said about every rollout token, one shard per rollout shard, two formats.

    iter_0001/teacher/part-0000J.arrow   (or part-0000J.zarr/)   scores of rollout shard J, one row per completion
    iter_0001/teacher/part-0000J.manifest.json                   spec, fingerprints, counts, sha256 (manifest.py)

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

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grpo_kd.cache.arrow_format import ArrowShardReader, ArrowShardWriter
from grpo_kd.cache.manifest import (
    CacheError,
    checksum,
    list_shard_manifests,
    rebuild_command,
    remove_shard,
    shard_data_path,
    size_bytes,
    verify_shard_checksum,
    write_shard_manifest,
)
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cache.spec import TEACHER_KIND, CacheSpec, ScoredRows, ShardReader, ShardWriter
from grpo_kd.fsutil import atomic_path


def open_shard_writer(path: Path, spec: CacheSpec, *, total_rows: int, total_tokens: int) -> ShardWriter:
    if spec.format == "arrow":
        return ArrowShardWriter(path, spec)
    from grpo_kd.cache.zarr_format import ZarrShardWriter  # zarr + numcodecs: 0.2-0.4 s, only for the zarr format

    return ZarrShardWriter(path, spec, total_rows=total_rows, total_tokens=total_tokens)


def open_shard_reader(path: Path, spec: CacheSpec) -> ShardReader:
    if spec.format == "arrow":
        return ArrowShardReader(path, spec)
    from grpo_kd.cache.zarr_format import ZarrShardReader  # zarr + numcodecs: 0.2-0.4 s, only for the zarr format

    return ZarrShardReader(path, spec)


# ----------------------------------------------------------------------------------------------- atomic shard


class TeacherShardSink:
    """Write teacher shard `shard` of `directory` atomically.

        with TeacherShardSink(dir, 0, spec, total_rows=R, total_tokens=N, manifest={...}) as sink:
            sink.add(scored_rows)          # any number of times, rows in any order
        # on a clean exit: data renamed into place (fsutil.atomic_path), then part-00000.manifest.json written

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
        self.rows_written = 0
        self.tokens_written = 0
        self._writer: ShardWriter | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "TeacherShardSink":
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_shard(self.directory, self.shard, keep=self.path)
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = open_shard_writer(tmp, self.spec, total_rows=self.total_rows, total_tokens=self.total_tokens)
        return self

    def add(self, scored: ScoredRows) -> None:
        """Append a batch; a batch with the wrong shapes or with numbers that are not log-probs (NaN, inf, > 0:
        a teacher with broken weights, or one that overflows in its dtype) raises, and nothing is written."""
        try:
            scored.check(self.spec)
        except CacheError as exc:
            raise CacheError(f"teacher shard {self.shard} of {self.directory}: {exc}; the teacher holds NaN/inf "
                             "weights or overflows in its dtype; nothing was written") from None
        assert self._writer is not None
        self._writer.add(scored)
        self.rows_written += len(scored.row)
        self.tokens_written += int(np.sum(scored.num_tokens))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # atomic_path removes the temporary data
            return
        with self._stack:  # the data is renamed into place only if closing and the count check raise nothing
            assert self._writer is not None
            self._writer.close()
            if (self.rows_written, self.tokens_written) != (self.total_rows, self.total_tokens):
                raise CacheError(f"teacher shard {self.shard}: wrote {self.rows_written} rows / "
                                 f"{self.tokens_written} tokens but {self.total_rows} / {self.total_tokens} were "
                                 "expected")
        self._write_manifest()

    def _write_manifest(self) -> None:
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


# ----------------------------------------------------------------------------------------------- the directory


@dataclass
class TeacherShard:
    shard: int
    path: Path
    manifest: dict[str, Any]
    spec: CacheSpec
    reader: ShardReader


def open_teacher_shards(directory: str | Path, *, verify: bool = True) -> list[TeacherShard]:
    """Every finished teacher shard of `directory`, opened for reading (memory-mapped for Arrow), each after
    checking its sha256 against its manifest (`verify=False` only for a caller that has just checked it)."""
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
        if verify:
            verify_shard_checksum(path, manifests[j], j)
        shards.append(TeacherShard(j, path, manifests[j], spec, open_shard_reader(path, spec)))
    return shards


def check_alignment(store: RolloutStore, shards: list[TeacherShard]) -> None:
    """Each rollout shard has its teacher shard, made from exactly that file, with the same row count."""
    if not shards:
        return
    directory = shards[0].path.parent
    by_shard = {s.shard: s for s in shards}
    specs = {(s.spec.format, s.spec.top_k, s.spec.num_samples, s.spec.token_level) for s in shards}
    if len(specs) > 1:
        raise CacheError(f"teacher shards were made with different settings: {sorted(specs)}")
    for rollout in store.shards:
        shard = by_shard.get(rollout.shard)
        if shard is None:
            raise CacheError(f"teacher shard {rollout.shard} of {directory} is missing; write it: "
                             f"{rebuild_command(directory, rollout.shard)}")
        scored = shard.manifest.get("rollouts", {})
        if scored.get("sha256") != rollout.manifest.get("sha256"):
            raise CacheError(f"teacher shard {shard.path} was made from other rollouts than {rollout.path} "
                             f"(checksums differ); rebuild it: {rebuild_command(directory, rollout.shard)}")
        if shard.manifest.get("rows") != rollout.num_rows:
            raise CacheError(f"teacher shard {shard.path.name} has {shard.manifest.get('rows')} rows but "
                             f"{rollout.path.name} has {rollout.num_rows}")
