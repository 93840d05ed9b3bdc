"""The Arrow IPC teacher-cache format (the default): uncompressed, memory-mapped, zero-copy row views.

One IPC *file* (random access, with a footer) per shard; one record batch per `ScoredRows` the teacher pass
hands over. Row fields are plain columns; a token field of width w is a `list<T>` column whose row holds the
row's C*w values flattened (C tokens x w), so row r of batch b is `values[offsets[r]:offsets[r+1]]`, a view of
the mapped file. The file is written to the caller's temporary path; `TeacherShardSink` renames it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from grpo_kd.cache.manifest import CacheError
from grpo_kd.cache.spec import CacheSpec, ScoredRows


def arrow_schema(spec: CacheSpec) -> pa.Schema:
    fields = [pa.field(name, pa.from_numpy_dtype(dtype), nullable=False) for name, dtype in spec.row_fields().items()]
    for name, (dtype, _width) in spec.token_fields().items():
        fields.append(pa.field(name, pa.list_(pa.from_numpy_dtype(dtype)), nullable=False))
    meta = {"grpo_kd.kind": "teacher_cache", "top_k": str(spec.top_k), "num_samples": str(spec.num_samples),
            "logprob_dtype": spec.logprob_dtype}
    return pa.schema(fields, metadata=meta)


class ArrowShardWriter:
    def __init__(self, path: Path, spec: CacheSpec):
        self.spec = spec
        self.schema = arrow_schema(spec)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)

    def add(self, scored: ScoredRows) -> None:
        columns = [pa.array(np.asarray(v, dtype=dtype)) for v, dtype in
                   zip((scored.row_columns()[n] for n in self.spec.row_fields()), self.spec.row_fields().values())]
        counts = np.asarray(scored.num_tokens, dtype=np.int64)
        for name, (_dtype, width) in self.spec.token_fields().items():
            offsets = np.concatenate([[0], np.cumsum(counts * max(width, 1))]).astype(np.int32)
            values = pa.array(np.ascontiguousarray(scored.token[name]).reshape(-1))
            columns.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values))
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


class ArrowShardReader:
    """A memory-mapped Arrow teacher shard. Row access by rollout row number."""

    def __init__(self, path: Path, spec: CacheSpec):
        self.spec = spec
        self.path = Path(path)
        try:
            self._file = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        except (pa.ArrowInvalid, OSError) as exc:
            raise CacheError(f"{path}: not a readable Arrow IPC file ({exc})") from None
        want = arrow_schema(spec)
        if not self._file.schema.remove_metadata().equals(want.remove_metadata()):
            missing = sorted(set(want.names) - set(self._file.schema.names))
            hint = f" (missing {', '.join(missing)}: an older cache layout? re-run cache-teacher)" if missing else ""
            raise CacheError(f"{path}: schema does not match its manifest's spec{hint}")
        self._batches = [self._file.get_batch(i) for i in range(self._file.num_record_batches)]
        self._rows = [b.column("row").to_numpy() for b in self._batches]
        all_rows = np.concatenate(self._rows) if self._rows else np.zeros(0, np.int64)
        self.num_rows = len(all_rows)
        size = int(all_rows.max()) + 1 if self.num_rows else 0
        self._where_batch = np.full(size, -1, np.int64)
        self._where_local = np.full(size, -1, np.int64)
        for b, rows in enumerate(self._rows):
            self._where_batch[rows] = b
            self._where_local[rows] = np.arange(len(rows))
        self._lists: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

    def rows(self) -> np.ndarray:
        return np.concatenate(self._rows) if self._rows else np.zeros(0, np.int64)

    def row_values(self, name: str) -> np.ndarray:
        """(max row + 1,) values of a row field placed at their rollout row."""
        out = np.zeros(len(self._where_batch), dtype=self.spec.row_fields()[name])
        for rows, batch in zip(self._rows, self._batches):
            out[rows] = batch.column(name).to_numpy()
        return out

    def _list(self, b: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        key = (b, name)
        if key not in self._lists:
            column = self._batches[b].column(name)
            self._lists[key] = (column.offsets.to_numpy(), column.values.to_numpy())
        return self._lists[key]

    def locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self._where_batch) or self._where_batch[row] < 0:
            raise CacheError(f"{self.path}: no teacher row for rollout row {row}")
        return int(self._where_batch[row]), int(self._where_local[row])

    def read(self, rows: np.ndarray, names: list[str]) -> dict[str, list[np.ndarray]]:
        """Per requested row, a zero-copy view [C] or [C, w] of each token field in `names`."""
        fields = self.spec.token_fields()
        out: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for row in np.asarray(rows).tolist():
            b, local = self.locate(row)
            for name in names:
                offsets, values = self._list(b, name)
                view = values[offsets[local]:offsets[local + 1]]
                width = fields[name][1]
                out[name].append(view.reshape(-1, width) if width else view)
        return out

    def iter_token_chunks(self, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Each record batch's token fields, flat over its rows ([N] or [N, w]), plus its row fields."""
        fields = self.spec.token_fields()
        for b, batch in enumerate(self._batches):
            chunk = {name: batch.column(name).to_numpy() for name in self.spec.row_fields()}
            for name in names:
                offsets, values = self._list(b, name)
                flat = values[offsets[0]:offsets[-1]]
                width = fields[name][1]
                chunk[name] = flat.reshape(-1, width) if width else flat
            yield chunk
