"""`logs/metrics.jsonl`: one JSON object per optimizer step, appended and flushed as it happens.

A resumed phase first drops the lines its iteration wrote after the checkpoint it resumes from, so the log of a
killed-and-resumed run reads exactly like the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from grpo_kd.fsutil import atomic_write_text


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, iteration: int, step: int) -> None:
        """Forget entries of `iteration` with a step after `step` (written before a kill)."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if not (line.get("iteration") == iteration and line.get("step", 0) > step)]
        atomic_write_text(self.path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        clean = {key: _plain(value) for key, value in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

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


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
