"""`logs/metrics.jsonl`: one JSON object per optimizer step, appended and flushed as it happens; and the run's one
step axis.

A resumed phase first drops the lines its iteration wrote after the checkpoint it resumes from, so the log of a
killed-and-resumed run reads exactly like the log of an uninterrupted one.

The global step: each line carries its iteration and its step within the iteration; the run's step axis numbers
them one after another, `global step = steps of the earlier iterations + step` (`iteration_offsets`). Every
reader of the log — the report, `grpo-kd compare`, the TensorBoard and W&B mirrors of each phase process —
derives it the same way from the log itself, so a phase needs no other state to place its numbers on the axis.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from grpo_kd.fsutil import atomic_write_text

# Keys of a line that place it rather than measure something.
POSITION_KEYS = ("iteration", "step", "epoch")


def iteration_offsets(rows: Iterable[dict]) -> dict[int, int]:
    """{iteration: global step before its first step}: the last step of every earlier iteration, summed, in
    iteration order. An iteration is counted by its largest step, so a resumed iteration counts once."""
    last: dict[int, int] = {}
    for row in rows:
        iteration, step = row.get("iteration"), row.get("step")
        if isinstance(iteration, int) and isinstance(step, int):
            last[iteration] = max(last.get(iteration, 0), step)
    offsets, total = {}, 0
    for iteration in sorted(last):
        offsets[iteration] = total
        total += last[iteration]
    offsets[max(last) + 1 if last else 1] = total  # where the next iteration starts
    return offsets


def offset_of(offsets: dict[int, int], iteration: int) -> int:
    """The global step before `iteration`'s first step; an iteration after the logged ones starts after them all."""
    if iteration in offsets:
        return offsets[iteration]
    earlier = [it for it in offsets if it < iteration]
    return offsets[max(earlier)] if earlier else 0


class Mirror(Protocol):
    """Where the log's numbers are copied as they are written (grpo_kd.train.tracking.Tracker: TensorBoard, W&B)."""

    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def purge_from(self, step: int) -> None: ...  # numbers at `step` and later were dropped by a resume

    def close(self) -> None: ...


class MetricsLog:
    """The JSONL log of the update's (and the SFT phase's, iteration 0) optimizer steps, mirrored to the run's
    trackers when `tracker` is given, at the global step of each line, under `phase/`."""

    def __init__(self, path: str | Path, tracker: Mirror | None = None, phase: str = "update"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        self.phase = phase
        self._offsets: dict[int, int] | None = None

    def truncate_after(self, iteration: int, step: int) -> None:
        """Forget entries of `iteration` with a step after `step` (written before a kill); the trackers hide
        their numbers from that step on too."""
        lines = self.read()
        kept = [line for line in lines if not (line.get("iteration") == iteration and line.get("step", 0) > step)]
        if self.path.exists():
            atomic_write_text(self.path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in kept))
        if self.tracker is not None and len(kept) < len(lines):
            self.tracker.purge_from(self.global_step(iteration, step + 1))

    def global_step(self, iteration: int, step: int) -> int:
        """The run-wide step of `step` of `iteration` (see the module doc)."""
        if self._offsets is None:
            self._offsets = iteration_offsets(self.read())
        return offset_of(self._offsets, iteration) + step

    def log(self, record: dict[str, Any]) -> None:
        clean = {key: _plain(value) for key, value in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.tracker is not None and isinstance(clean.get("iteration"), int) and isinstance(clean.get("step"), int):
            values = {f"{self.phase}/{key}": value for key, value in numbers(clean).items()}
            self.tracker.log(values, self.global_step(clean["iteration"], clean["step"]))

    def close(self) -> None:
        """Close the trackers (the JSONL file is closed after every line)."""
        if self.tracker is not None:
            self.tracker.close()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
        return lines


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a line, nested keys joined with "/", the position keys left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in POSITION_KEYS:
            continue
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
