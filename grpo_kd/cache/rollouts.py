"""The rollout store: one Arrow IPC file per shard, one row per sampled completion, memory-mapped.

    iter_0001/rollouts/part-0000J.arrow            rows sorted by (group_id, sample_index)
    iter_0001/rollouts/part-0000J.manifest.json    student fingerprint, sampling params, counts, sha256
    iter_0001/rollouts/manifest.json               merged index (see grpo_kd.cache.manifest)

Writing (the rollout phase):

    records = [RolloutRecord(prompt_id="p7", group_id=7, sample_index=s, prompt_ids=[...], completion_ids=[...],
                             old_logprobs=[...], finish_reason="stop", prompt_text=..., completion_text=...)]
    write_rollout_shard(run.rollouts(1), shard=0, records=records,
                        meta={"student": tokenizer_fingerprint(tok), "model": model_fingerprint(model),
                              "sampling": {"temperature": 1.0, "top_p": 1.0, "group_size": 4}})

Reading:

    store = RolloutStore.open(run.rollouts(1))
    len(store); store[i] -> RolloutRecord; store.groups() -> [GroupSlice(shard, start, stop, group_id)]
    store.group(g) -> list[RolloutRecord]; store.token_count; store.shards[j].list_column("completion_ids")

Key design choice: a group (all completions of one prompt) is a contiguous run of rows of one shard, so a reader
of whole groups touches one file per group and the teacher cache, which mirrors the rollout shards row for row,
never needs a cross-shard join. `write_rollout_shard` sorts its records and `RolloutStore.open` refuses a
directory where one group id appears in two shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from grpo_kd.cache.manifest import (
    CacheError,
    checksum,
    list_shard_manifests,
    remove_shard,
    shard_data_path,
    size_bytes,
    verify_shard_checksum,
    write_index,
    write_shard_manifest,
)
from grpo_kd.cache.values import logprob_problem
from grpo_kd.fsutil import atomic_path

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),  # the prompt's index in the iteration
        pa.field("sample_index", pa.int32(), nullable=False),  # 0..G-1 within the group
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("old_logprobs", pa.list_(pa.float32()), nullable=False),  # behaviour log-prob per sampled token
        pa.field("student_logprobs", pa.list_(pa.float32()), nullable=True),  # teacher-mixed sampling only
        pa.field("sampler_logprobs", pa.list_(pa.float32()), nullable=True),  # the engine's own (vLLM) only
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length"
        pa.field("prompt_text", pa.string(), nullable=False),
        pa.field("completion_text", pa.string(), nullable=False),
        pa.field("privileged", pa.string(), nullable=True),
    ]
)
ROLLOUT_SUFFIX = "arrow"
ROLLOUT_KIND = "rollouts"


@dataclass
class RolloutRecord:
    """One sampled completion. Token lists may be Python lists or 1-D numpy arrays."""

    prompt_id: str
    group_id: int
    sample_index: int
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    old_logprobs: Sequence[float]  # (C,) behaviour log-probs, one per completion token
    finish_reason: str = "length"
    prompt_text: str = ""
    completion_text: str = ""
    privileged: str | None = None
    student_logprobs: Sequence[float] | None = None  # (C,) when sampling was teacher-mixed
    sampler_logprobs: Sequence[float] | None = None  # (C,) the sampling engine's own log-probs (rollout.engine vllm)

    def check(self) -> None:
        n = len(self.completion_ids)
        if len(self.old_logprobs) != n:
            raise CacheError(f"rollout {self.prompt_id}/{self.sample_index}: {len(self.old_logprobs)} old_logprobs "
                             f"for {n} completion tokens")
        for name in ("student_logprobs", "sampler_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise CacheError(f"rollout {self.prompt_id}/{self.sample_index}: {len(values)} {name} for {n} "
                                 "completion tokens")
        if len(self.prompt_ids) == 0:
            raise CacheError(f"rollout {self.prompt_id}/{self.sample_index}: empty prompt_ids")
        for name in ("old_logprobs", "student_logprobs"):
            values = getattr(self, name)
            why = None if values is None else logprob_problem(name, np.asarray(values, np.float32))
            if why:
                raise CacheError(f"rollout {self.prompt_id}/{self.sample_index}: {why}; the student (or the teacher "
                                 "mixed in) holds NaN/inf weights or overflows in its dtype; nothing was written")


def _records_table(records: list[RolloutRecord]) -> pa.Table:
    def lists(name: str, dtype: Any) -> pa.Array:
        values = [None if getattr(r, name) is None else np.asarray(getattr(r, name), dtype=dtype) for r in records]
        return pa.array(values, type=pa.list_(pa.from_numpy_dtype(dtype)))

    columns = {
        "prompt_id": pa.array([str(r.prompt_id) for r in records], pa.string()),
        "group_id": pa.array([int(r.group_id) for r in records], pa.int64()),
        "sample_index": pa.array([int(r.sample_index) for r in records], pa.int32()),
        "prompt_ids": lists("prompt_ids", np.int32),
        "completion_ids": lists("completion_ids", np.int32),
        "old_logprobs": lists("old_logprobs", np.float32),
        "student_logprobs": lists("student_logprobs", np.float32),
        "sampler_logprobs": lists("sampler_logprobs", np.float32),
        "finish_reason": pa.array([r.finish_reason for r in records], pa.string()),
        "prompt_text": pa.array([r.prompt_text for r in records], pa.string()),
        "completion_text": pa.array([r.completion_text for r in records], pa.string()),
        "privileged": pa.array([r.privileged for r in records], pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)


def write_rollout_shard(
    directory: str | Path,
    shard: int,
    records: Iterable[RolloutRecord],
    *,
    meta: dict[str, Any],
    index: bool = True,
) -> Path:
    """Write rollout shard `shard` atomically and return its path; replaces an earlier version of that shard.

    `meta` goes into the shard manifest as is: put the student's `tokenizer` fingerprint under
    `meta["student"]`, its model fingerprint under `meta["model"]` and the sampling parameters under
    `meta["sampling"]`. Records are sorted by (group_id, sample_index). `index=False` skips rewriting the merged
    `manifest.json`: pass it when several processes write shards of one directory at the same time.
    """
    directory = Path(directory)
    records = sorted(records, key=lambda r: (int(r.group_id), int(r.sample_index)))
    for record in records:
        record.check()
    table = _records_table(records)
    path = shard_data_path(directory, shard, ROLLOUT_SUFFIX)
    remove_shard(directory, shard, keep=path)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, ROLLOUT_SCHEMA) as writer:
            writer.write_table(table)
    group_ids = sorted({int(r.group_id) for r in records})
    manifest = {
        "kind": ROLLOUT_KIND,
        "file": path.name,
        "sha256": checksum(path),
        "bytes": size_bytes(path),
        "rows": len(records),
        "groups": len(group_ids),
        "group_ids": group_ids,
        "prompt_tokens": int(sum(len(r.prompt_ids) for r in records)),
        "tokens": int(sum(len(r.completion_ids) for r in records)),  # completion tokens
        "teacher_mixed": any(r.student_logprobs is not None for r in records),
        "sampler_logprobs": any(r.sampler_logprobs is not None for r in records),
        "meta": meta,
    }
    write_shard_manifest(directory, shard, manifest)
    if index:
        write_index(directory, ROLLOUT_KIND)
    return path


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class GroupSlice:
    """The rows of one group: `store.shards[shard]` rows `start:stop` (contiguous by construction)."""

    shard: int
    start: int
    stop: int
    group_id: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class RolloutShard:
    """One memory-mapped rollout file. `list_column` gives zero-copy numpy (offsets, values) views."""

    shard: int
    path: Path
    manifest: dict[str, Any]
    table: pa.Table
    _lists: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def list_column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [R+1] int32, values [sum] ) of a list column; row i is values[offsets[i]:offsets[i+1]]."""
        if name not in self._lists:
            array = self.table.column(name).combine_chunks()
            self._lists[name] = (array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=False))
        return self._lists[name]

    def lengths(self, name: str = "completion_ids") -> np.ndarray:
        return np.diff(self.list_column(name)[0])

    def record(self, row: int) -> RolloutRecord:
        values = {name: self.table.column(name)[row].as_py() for name in ROLLOUT_SCHEMA.names
                  if name in self.table.column_names}  # a shard written before a nullable column was added
        return RolloutRecord(**values)


class RolloutStore:
    """All finished shards of one iteration's rollouts, memory-mapped, indexed by a global row number."""

    def __init__(self, directory: Path, shards: list[RolloutShard]):
        self.directory = directory
        self.shards = shards
        self._row_starts = np.cumsum([0] + [s.num_rows for s in shards])
        self._groups = self._index_groups()

    @classmethod
    def open(cls, directory: str | Path, *, verify: bool = True) -> "RolloutStore":
        """Memory-map every finished shard of `directory` after checking its sha256 against its manifest (one
        read of the file; `verify=False` only for a caller that has just checked it)."""
        directory = Path(directory)
        manifests = list_shard_manifests(directory)
        if not manifests:
            raise CacheError(f"no finished rollout shards in {directory} (run `grpo-kd rollout` first)")
        shards = []
        for j in sorted(manifests):
            path = shard_data_path(directory, j, ROLLOUT_SUFFIX)
            if not path.is_file():
                raise CacheError(f"rollout shard {path} is listed by its manifest but missing")
            if verify:
                verify_shard_checksum(path, manifests[j], j)
            try:
                table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            except (pa.ArrowInvalid, OSError) as exc:
                raise CacheError(f"{path}: not a readable Arrow IPC file ({exc})") from None
            shards.append(RolloutShard(j, path, manifests[j], table))
        return cls(directory, shards)

    def _index_groups(self) -> list[GroupSlice]:
        groups: list[GroupSlice] = []
        seen: dict[int, int] = {}
        for shard in self.shards:
            ids = shard.table.column("group_id").to_numpy()
            if len(ids) == 0:
                continue
            cuts = np.flatnonzero(np.diff(ids)) + 1
            starts = np.concatenate([[0], cuts])
            stops = np.concatenate([cuts, [len(ids)]])
            for start, stop in zip(starts.tolist(), stops.tolist()):
                gid = int(ids[start])
                if gid in seen:
                    raise CacheError(f"group {gid} appears in rollout shards {seen[gid]} and {shard.shard}: "
                                     "a group must not be split")
                seen[gid] = shard.shard
                groups.append(GroupSlice(shard.shard, start, stop, gid))
        return groups

    # -- sizes
    def __len__(self) -> int:
        return int(self._row_starts[-1])

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    @property
    def token_count(self) -> int:
        """Completion tokens over all shards."""
        return int(sum(s.manifest["tokens"] for s in self.shards))

    @property
    def shard_ids(self) -> list[int]:
        return [s.shard for s in self.shards]

    def shard(self, j: int) -> RolloutShard:
        for s in self.shards:
            if s.shard == j:
                return s
        raise CacheError(f"rollout shard {j} is not in {self.directory} (have {self.shard_ids})")

    # -- access
    def locate(self, row: int) -> tuple[int, int]:
        """Global row -> (position in self.shards, row within that shard)."""
        if not 0 <= row < len(self):
            raise IndexError(f"rollout row {row} out of range 0..{len(self) - 1}")
        pos = int(np.searchsorted(self._row_starts, row, side="right") - 1)
        return pos, row - int(self._row_starts[pos])

    def __getitem__(self, row: int) -> RolloutRecord:
        pos, local = self.locate(row)
        return self.shards[pos].record(local)

    def __iter__(self) -> Iterator[RolloutRecord]:
        for i in range(len(self)):
            yield self[i]

    def groups(self) -> list[GroupSlice]:
        return list(self._groups)

    def group(self, index: int) -> list[RolloutRecord]:
        """The records of the `index`-th group (in store order, not by group id)."""
        g = self._groups[index]
        shard = self.shard(g.shard)
        return [shard.record(r) for r in range(g.start, g.stop)]

    def iter_groups(self) -> Iterator[list[RolloutRecord]]:
        for i in range(len(self._groups)):
            yield self.group(i)
