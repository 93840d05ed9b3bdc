"""Work kept from a killed `cache-teacher` run: scored batches of an unfinished shard, for the next run to reuse.

    progress = ShardProgress(teacher_dir, shard=3, spec=spec, key={...params, rollouts, teacher model...})
    done = progress.load()             # {batch index: ScoredRows} kept by an earlier run with the same key
    progress.save(n, scored)           # after batch n is scored
    progress.clear()                   # once the shard itself is finished

Layout: `progress-0000J/key.json` (what the batches were made from) and one `batch-NNNNN.npz` per scored batch,
each written to a temporary name and renamed; `reference.npz` holds the reference pass's log-probs of the shard
with its own key (`save_reference` / `load_reference`), since that pass runs before the teacher is loaded. The
final shard is still written only by `TeacherShardSink` and still atomically; these files only save forward
passes. A resumed run replays the kept batches into the sink in their original order and scores the rest, so
its shard is byte-identical to an uninterrupted run's.

Key design choice: **kept work is trusted only as far as it can be checked.** A batch file that does not load
(cut short by a crash), fails the cache spec's shape and dtype check, or holds other rows than the batch it
claims to be, is dropped and scored again; a key that differs in anything (settings, rollout file, teacher or
reference weights) drops every kept batch (or the kept reference log-probs). Files are read with
`allow_pickle=False`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from grpo_kd.cache.teacher import CacheSpec, ScoredRows
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
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
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


REFERENCE_NAME = "reference.npz"


def save_reference(directory: Path, shard: int, key: dict[str, Any], logprobs: list[np.ndarray]) -> None:
    """Keep the reference log-probs of every row of shard `shard` (a list of (C,) float32 arrays)."""
    path = progress_dir(directory, shard)
    path.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(x) for x in logprobs], np.int64)
    values = np.concatenate(logprobs).astype(np.float32) if logprobs else np.zeros(0, np.float32)
    _save_npz(path / REFERENCE_NAME, {"key": np.array(json.dumps(_jsonable(key), sort_keys=True)),
                                      "lengths": lengths, "values": values})


def load_reference(directory: Path, shard: int, key: dict[str, Any], lengths: np.ndarray) -> list[np.ndarray] | None:
    """The kept reference log-probs of shard `shard` when they were made under `key` for rows of `lengths`."""
    path = progress_dir(directory, shard) / REFERENCE_NAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            same = str(data["key"]) == json.dumps(_jsonable(key), sort_keys=True)
            kept, values = data["lengths"], data["values"]
        if not same or not np.array_equal(kept, lengths) or len(values) != int(kept.sum()):
            return None
    except Exception:  # noqa: BLE001 - a file cut short can fail anywhere in numpy's zip reader
        return None
    return np.split(values, np.cumsum(kept)[:-1]) if len(kept) else []


def _save_npz(final: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(final) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz" to a name
        np.savez(handle, **arrays)


def _jsonable(obj: Any) -> Any:
    """The key as it reads back from JSON (tuples become lists), so that a comparison is exact."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
