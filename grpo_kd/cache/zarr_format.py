"""The Zarr v3 teacher-cache format: compressed, chunked by tokens, for shared or object storage.

One Zarr group (a directory) per shard:

    part-0000J.zarr/topk_ids        int32   [N, k]   chunks [CHUNK_TOKENS, k]    Blosc zstd, byte shuffle
    part-0000J.zarr/topk_logprobs   f16|u16 [N, k]   (Zarr has no bfloat16: bf16 is stored as its uint16 bits)
    part-0000J.zarr/target_logprobs float32 [N]      ... every token field of CacheSpec.token_fields()
    part-0000J.zarr/row, group_id, num_tokens, seq_logprob, token_start, ...   [R]   one chunk each

N is the shard's completion-token count, known before the pass starts, so the arrays are created at their final
size and rows are appended in the order the teacher produced them; `token_start[i]` says where row i begins.
The writer buffers tokens and writes whole chunks only (no read-modify-write of a compressed chunk). A reader
gathers a batch's token ranges with one orthogonal selection per field, so each chunk is decompressed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from grpo_kd.cache.manifest import CacheError
from grpo_kd.cache.spec import CacheSpec, ScoredRows

CHUNK_TOKENS = 1024  # tokens per chunk: at k=64, 256 KiB of ids and 128 KiB of float16 log-probs


def _compressor(dtype: np.dtype) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=dtype.itemsize)


class ZarrShardWriter:
    def __init__(self, path: Path, spec: CacheSpec, *, total_rows: int, total_tokens: int):
        self.spec = spec
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.group.attrs.update({"grpo_kd.kind": "teacher_cache", "top_k": spec.top_k,
                                 "num_samples": spec.num_samples, "logprob_dtype": spec.logprob_dtype})
        self.arrays = {}
        for name, (dtype, width) in spec.token_fields().items():
            shape = (total_tokens, width) if width else (total_tokens,)
            chunks = (CHUNK_TOKENS, width) if width else (CHUNK_TOKENS * 16,)
            self.arrays[name] = self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                                        compressors=_compressor(dtype), fill_value=0)
        self.total_rows = total_rows
        self.total_tokens = total_tokens
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self._pending_tokens = 0
        self._cursor = 0  # tokens written to the arrays so far
        self._rows: dict[str, list[np.ndarray]] = {name: [] for name in [*spec.row_fields(), "token_start"]}
        self._next_start = 0

    def add(self, scored: ScoredRows) -> None:
        counts = np.asarray(scored.num_tokens, dtype=np.int64)
        starts = self._next_start + np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        self._next_start += int(counts.sum())
        for name, values in scored.row_columns().items():
            self._rows[name].append(np.asarray(values, dtype=self.spec.row_fields()[name]))
        self._rows["token_start"].append(starts.astype(np.int64))
        for name in self.arrays:
            self._pending[name].append(np.ascontiguousarray(scored.token[name]))
        self._pending_tokens += int(counts.sum())
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n = self._pending_tokens if final else (self._pending_tokens // CHUNK_TOKENS) * CHUNK_TOKENS
        if n == 0:
            return
        for name, array in self.arrays.items():
            block = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else self._pending[name][0]
            array[self._cursor:self._cursor + n] = block[:n]
            self._pending[name] = [block[n:]] if n < len(block) else []
        self._cursor += n
        self._pending_tokens -= n

    def close(self) -> None:
        self._flush(final=True)
        if self._cursor != self.total_tokens and self.arrays:
            raise CacheError(f"zarr shard: {self._cursor} tokens written, {self.total_tokens} expected")
        for name, parts in self._rows.items():
            values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            dtype = np.dtype(np.int64) if name == "token_start" else self.spec.row_fields()[name]
            self.group.create_array(name, data=values.astype(dtype), chunks=(max(1, len(values)),),
                                    compressors=_compressor(dtype))


class ZarrShardReader:
    def __init__(self, path: Path, spec: CacheSpec):
        self.spec = spec
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(path), mode="r", zarr_format=3)
            self._row_values = {name: self.group[name][:] for name in [*spec.row_fields(), "token_start"]}
            self.arrays = {name: self.group[name] for name in spec.token_fields()}
        except Exception as exc:  # zarr raises several types for a damaged store
            raise CacheError(f"{path}: not a readable Zarr store for its manifest's spec ({exc})") from None
        rows = self._row_values["row"]
        self.num_rows = len(rows)
        self._where = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, np.int64)
        self._where[rows] = np.arange(len(rows))

    def rows(self) -> np.ndarray:
        return self._row_values["row"]

    def row_values(self, name: str) -> np.ndarray:
        out = np.zeros(len(self._where), dtype=self.spec.row_fields()[name])
        out[self._row_values["row"]] = self._row_values[name]
        return out

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        bad = (rows < 0) | (rows >= len(self._where))
        if bad.any() or (self._where[rows[~bad]] < 0).any():
            raise CacheError(f"{self.path}: no teacher row for some of rollout rows {rows.tolist()[:8]}")
        return self._where[rows]

    def read(self, rows: np.ndarray, names: list[str]) -> dict[str, list[np.ndarray]]:
        pos = self._positions(rows)
        starts = self._row_values["token_start"][pos]
        counts = self._row_values["num_tokens"][pos].astype(np.int64)
        index = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)]) if len(pos) else np.zeros(0)
        cuts = np.cumsum(counts)[:-1]
        out = {}
        for name in names:
            array = self.arrays[name]
            selection = (index, slice(None)) if array.ndim == 2 else (index,)
            data = array.get_orthogonal_selection(selection) if len(index) else np.zeros((0, *array.shape[1:]),
                                                                                         array.dtype)
            out[name] = np.split(data, cuts)
        return out

    def iter_token_chunks(self, names: list[str], block_tokens: int = 1 << 16) -> Iterator[dict[str, np.ndarray]]:
        counts = self._row_values["num_tokens"].astype(np.int64)
        starts = self._row_values["token_start"]
        i = 0
        while i < self.num_rows:
            j, total = i, 0
            while j < self.num_rows and (j == i or total + counts[j] <= block_tokens):
                total += counts[j]
                j += 1
            chunk = {name: self._row_values[name][i:j] for name in self.spec.row_fields()}
            lo = int(starts[i])
            for name in names:
                chunk[name] = self.arrays[name][lo:lo + total]
            yield chunk
            i = j
