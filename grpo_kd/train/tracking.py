"""Experiment tracking: each phase's numbers as TensorBoard event files under RUN/logs/tensorboard/ and, with
`tracking.wandb: true`, in a Weights & Biases run, all on the run's one step axis (the global optimizer step of
grpo_kd/train/metrics.py).

    tracker = Tracker.for_run(cfg)                    # checks the packages; opens nothing yet
    tracker.log({"update/loss": 0.31}, step=17)       # the first number opens the writers

    tensorboard --logdir runs/NAME                    # learning curves across phases and iterations

Key design choices:
- logs/metrics.jsonl stays the record that the report and `grpo-kd compare` read; the trackers mirror it as it is
  written (MetricsLog) and add each phase's summary (`log_phase`): rollout throughput and completion length,
  the teacher pass's tokens and time. A rollout or teacher summary of iteration i sits at the step where
  iteration i's update starts from (the last step of iteration i-1; 0 for the first).
- Every phase process writes its own event file in the one directory (TensorBoard merges them), and phases run
  in one process (`grpo-kd run --in-process`) share that process's file: TensorBoard reads a directory's files
  in name order, and names made within one second sort by a per-process counter, not by time. A resumed update
  that dropped metric lines hides the events from that step on (a SessionLog START event at that step, which is
  what SummaryWriter's purge_step writes), as the log does.
- W&B: one W&B run per grpo-kd run, resumed by every phase process under an id made from the run directory;
  offline by default (files under RUN/logs/wandb; `wandb sync` uploads them). Online, a SLURM array of phase
  tasks would resume the run concurrently, which W&B does not promise to merge: keep those offline.
- Nothing is imported or opened before the first number: with tracking off a phase pays one `if`, with it on
  the import happens in the process that logs (TensorBoard's writer 0.2-0.5 s, wandb 0.4-1.0 s on a loaded
  2-core machine; docs/slurm.md, "Start-up cost of a phase").
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping

from grpo_kd.config import Config, TrackingConfig, to_dict
from grpo_kd.errors import GrpoKdError
from grpo_kd.train.metrics import MetricsLog, iteration_offsets, offset_of

TENSORBOARD_DIR = "tensorboard"  # under RUN/logs/
_EVENT_WRITERS: dict[Path, Any] = {}  # one TensorBoard event file per directory and process (module doc)
WANDB_HINT = "tracking.wandb needs the wandb package: pip install 'grpo-kd[wandb]' (or set tracking.wandb=false)"
TENSORBOARD_HINT = ("tracking.tensorboard needs the tensorboard package: pip install tensorboard "
                    "(or set tracking.tensorboard=false)")


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of a grpo-kd run: its name and a hash of its absolute directory (W&B ids allow [A-Za-z0-9_-])."""
    path = Path(run_dir).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", path.name)[:40] or "run"
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


class Tracker:
    """The trackers a `TrackingConfig` enables for one run directory, opened at the first number logged."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, *, run_name: str = "run",
                 config: dict[str, Any] | None = None):
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise GrpoKdError(TENSORBOARD_HINT)
        if cfg.wandb and importlib.util.find_spec("wandb") is None:
            raise GrpoKdError(WANDB_HINT)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.config = config or {}
        self._tensorboard = None
        self._wandb = None
        self._purge_step: int | None = None

    @classmethod
    def for_run(cls, cfg: Config) -> "Tracker | None":
        """The tracker of `cfg`'s run, or None when every tracker is off."""
        if not (cfg.tracking.tensorboard or cfg.tracking.wandb):
            return None
        return cls(cfg.tracking, cfg.run_dir, run_name=cfg.name, config=to_dict(cfg))

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "logs" / TENSORBOARD_DIR

    def purge_from(self, step: int) -> None:
        """Hide TensorBoard events at `step` and later that earlier (killed) processes wrote."""
        self._purge_step = step

    def log(self, values: Mapping[str, float], step: int) -> None:
        if not values:
            return
        if self.cfg.tensorboard:
            writer = self._tensorboard_writer()
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()  # one small write per optimizer step; a killed phase loses nothing it logged
        if self.cfg.wandb:
            self._wandb_run().log({"global_step": step, **values})

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()  # the process's shared writer stays open for the next phase (module doc)
            self._tensorboard = None
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # finish() may return before W&B's service has written the run file; this waits
            self._wandb = None

    def _tensorboard_writer(self):
        if self._tensorboard is None:
            self._tensorboard = _event_writer(self.tensorboard_dir)
            if self._purge_step is not None:
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                start = Event(step=self._purge_step, session_log=SessionLog(status=SessionLog.START))
                self._tensorboard._get_file_writer().add_event(start)
        return self._tensorboard

    def _wandb_run(self):
        if self._wandb is None:
            import wandb  # 0.4-1.0 s: only with tracking.wandb

            logs = self.run_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=self.cfg.wandb_project, entity=self.cfg.wandb_entity, mode=self.cfg.wandb_mode,
                dir=str(logs), id=wandb_run_id(self.run_dir), name=self.run_name, resume="allow",
                config=self.config, settings=wandb.Settings(console="off"),
            )
            self._wandb.define_metric("global_step")
            self._wandb.define_metric("*", step_metric="global_step")
        return self._wandb


def _event_writer(directory: Path):
    """This process's TensorBoard writer of `directory`, opened once and closed when the process exits."""
    key = directory.resolve()
    if key not in _EVENT_WRITERS:
        from torch.utils.tensorboard import SummaryWriter  # 0.2-0.5 s (tensorboard, protobuf): only when logging

        if not _EVENT_WRITERS:
            atexit.register(_close_event_writers)
        _EVENT_WRITERS[key] = SummaryWriter(str(directory))
    return _EVENT_WRITERS[key]


def _close_event_writers() -> None:
    for writer in _EVENT_WRITERS.values():
        writer.close()
    _EVENT_WRITERS.clear()


def phase_numbers(phase: str, summary: Any, seconds: float) -> dict[str, float]:
    """The numbers of a finished rollout or teacher pass worth a curve (nothing for a phase that was already done)."""
    if phase == "rollout" and not summary.skipped:
        return {"rollout/seconds": seconds, "rollout/completions": float(summary.completions),
                "rollout/completion_tokens_mean": summary.tokens / max(summary.completions, 1),
                "rollout/tokens_per_second": summary.tokens / summary.seconds if summary.seconds > 0 else 0.0}
    if phase == "cache-teacher" and summary.shards_done:
        return {"cache-teacher/seconds": seconds, "cache-teacher/tokens": float(summary.tokens),
                "cache-teacher/tokens_per_second": summary.tokens / seconds if seconds > 0 else 0.0}
    return {}


def log_phase(tracker: Tracker | None, run_metrics: Path, phase: str, iteration: int, shard: int, num_shards: int,
              summary: Any, seconds: float) -> None:
    """Mirror a rollout or teacher-pass summary to the trackers, at the step iteration `iteration` starts from."""
    values = phase_numbers(phase, summary, seconds)
    if tracker is None or not values:
        return
    if num_shards > 1:
        values = {f"{tag}/shard_{shard}": value for tag, value in values.items()}
    tracker.log(values, offset_of(iteration_offsets(MetricsLog(run_metrics).read()), iteration))
    tracker.close()
