"""Work kept from a killed `cache-teacher` run: scored batches of an unfinished shard, for the next run to reuse.

    progress = ShardProgress(teacher_dir, shard=3, spec=spec, key={...params, rollouts, teacher model...})
    done = progress.load()             # {batch index: ScoredRows} kept by an earlier run with the same key
    progress.save(n, scored)           # after batch n is scored
    progress.clear()                   # once the shard itself is finished (reference batches included)

Layout: `progress-0000J/key.json` (what the batches were made from) and one `batch-NNNNN.npz` per scored batch,
each written to a temporary name and renamed; one `reference-NNNNN.npz` per batch of the reference pass, which
runs before the teacher is loaded, each carrying its own key (`save_reference_batch` / `load_reference_batches`).
The final shard is still written only by `TeacherShardSink` and still atomically; these files only save forward
passes. A resumed run replays the kept batches into the sink in their original order and scores the rest, so
its shard is byte-identical to an uninterrupted run's.

Key design choice: **kept work is trusted only as far as it can be checked.** Each file carries the sha256 of its
arrays (an entry `sha256` beside them, written with them in one atomic file). A batch file that does not load
(cut short by a crash), does not match its sha256 (changed since), fails the cache spec's shape, dtype and value
checks (NaN, inf, a log-prob above 0), or holds other rows than the batch it claims to be, is dropped and scored
again; a key that differs in anything (settings, rollout file, teacher or
reference weights) drops every kept batch (or every kept reference batch). Files are read with
`allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from grpo_kd.cache.spec import CacheSpec, ScoredRows
from grpo_kd.cache.values import logprob_problem
from grpo_kd.fsutil import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

KEY_NAME = "key.json"
_ROW = ("row", "group_id", "num_tokens", "seq_logprob")
_TOKEN, _EXTRA = "token.", "extra."


def progress_dir(directory: Path, shard: int) -> Path:
    return Path(directory) / f"progress-{shard:05d}"


def kept_batch_files(directory: Path, shard: int) -> list[Path]:
    """The batch files kept for unfinished shard `shard` of the teacher directory `directory`, in batch order."""
    return sorted(progress_dir(directory, shard).glob("batch-*.npz"))


class ShardProgress:
    """The kept batches of one unfinished teacher shard (see the module doc)."""

    def __init__(self, directory: Path, shard: int, spec: CacheSpec, key: dict[str, Any]):
        self.path = progress_dir(directory, shard)
        self.shard = shard
        self.spec = spec
        self.key = key

    def load(self) -> dict[int, ScoredRows]:
        """The batches kept under the same key; anything else in the directory is removed."""
        if not self.path.is_dir():
            return {}
        try:
            same = json.loads((self.path / KEY_NAME).read_text(encoding="utf-8")) == _jsonable(self.key)
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("teacher shard %d: kept batches were made with other settings or inputs; scoring afresh",
                     self.shard)
            for path in [self.path / KEY_NAME, *self._batch_files()]:
                path.unlink(missing_ok=True)
            return {}
        done: dict[int, ScoredRows] = {}
        for path in self._batch_files():
            scored = self._read(path)
            if scored is None:
                path.unlink(missing_ok=True)
            else:
                done[int(path.stem.split("-")[1])] = scored
        return done

    def start(self) -> None:
        """Make the directory and record the key (before the first batch is saved)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / KEY_NAME, _jsonable(self.key))

    def save(self, index: int, scored: ScoredRows) -> None:
        arrays = {name: np.asarray(value) for name, value in zip(_ROW, (scored.row, scored.group_id,
                                                                         scored.num_tokens, scored.seq_logprob))}
        arrays.update({_TOKEN + name: value for name, value in scored.token.items()})
        arrays.update({_EXTRA + name: value for name, value in (scored.extra or {}).items()})
        _save_npz(self.path / f"batch-{index:05d}.npz", arrays)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _batch_files(self) -> list[Path]:
        return kept_batch_files(self.path.parent, self.shard)

    def _read(self, path: Path) -> ScoredRows | None:
        try:
            arrays = _load_npz(path)
            scored = ScoredRows(
                row=arrays["row"], group_id=arrays["group_id"], num_tokens=arrays["num_tokens"],
                seq_logprob=arrays["seq_logprob"],
                token={k[len(_TOKEN):]: v for k, v in arrays.items() if k.startswith(_TOKEN)},
                extra={k[len(_EXTRA):]: v for k, v in arrays.items() if k.startswith(_EXTRA)} or None,
            )
            scored.check(self.spec)
            return scored
        except Exception as exc:  # noqa: BLE001 - a file cut short can fail anywhere in numpy's zip reader
            log.warning("teacher shard %d: dropping unreadable kept batch %s (%s)", self.shard, path.name,
                        type(exc).__name__)
            return None


REFERENCE_PREFIX = "reference-"


def kept_reference_files(directory: Path, shard: int) -> list[Path]:
    """The reference-pass batch files kept for unfinished shard `shard`, in batch order."""
    return sorted(progress_dir(directory, shard).glob(f"{REFERENCE_PREFIX}*.npz"))


def save_reference_batch(directory: Path, shard: int, key: dict[str, Any], index: int, rows: np.ndarray,
                         logprobs: np.ndarray) -> None:
    """Keep the reference log-probs of batch `index` of shard `shard`: its rows and their tokens' log-probs,
    concatenated in row order ((N,) float32), under `key`."""
    path = progress_dir(directory, shard)
    path.mkdir(parents=True, exist_ok=True)
    _save_npz(path / f"{REFERENCE_PREFIX}{index:05d}.npz",
              {"key": np.array(json.dumps(_jsonable(key), sort_keys=True)), "rows": np.asarray(rows, np.int64),
               "values": np.asarray(logprobs, np.float32)})


def load_reference_batches(directory: Path, shard: int, key: dict[str, Any],
                           lengths: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{batch index: (rows, (N,) log-probs)} of the reference batches kept under `key` whose sizes fit the rows'
    completion `lengths`; any other reference file of the shard (other key, cut short) is removed."""
    wanted = json.dumps(_jsonable(key), sort_keys=True)
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for path in kept_reference_files(directory, shard):
        try:
            data = _load_npz(path)
            same = str(data["key"]) == wanted
            rows, values = data["rows"], data["values"]
            fits = same and rows.ndim == 1 and rows.size and rows.min() >= 0 and rows.max() < len(lengths) and \
                len(values) == int(lengths[rows].sum()) and logprob_problem("reference", values) is None
        except Exception:  # noqa: BLE001 - a file cut short can fail anywhere in numpy's zip reader
            fits = False
        if fits:
            kept[int(path.stem[len(REFERENCE_PREFIX):])] = (rows, values)
        else:
            path.unlink(missing_ok=True)
    return kept


_DIGEST = "sha256"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `arrays`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _save_npz(final: Path, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` and their sha256 in one npz, written atomically."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    with atomic_path(final) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz" to a name
        np.savez(handle, **arrays, **{_DIGEST: np.array(_digest(arrays))})


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a kept file (no pickle); raises ValueError when they do not match the sha256 stored with them."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    stored = str(arrays.pop(_DIGEST, ""))
    if stored != _digest(arrays):
        raise ValueError(f"{path.name} does not match its sha256")
    return arrays


def _jsonable(obj: Any) -> Any:
    """The key as it reads back from JSON (tuples become lists), so that a comparison is exact."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
