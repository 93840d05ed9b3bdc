"""Where a chain stands: the job ids it recorded, SLURM's view of them, and the run directory's.

    jobs = JobRecord.load_all(paths)          # RUN/slurm/jobs.json, written by submit.py
    rows = chain_status(cfg, paths)           # one StepStatus per phase and iteration

Key design choice: SLURM without accounting forgets a job `MinJobAge` seconds after it ends and has no
`sacct`, so the run directory is the authority on "done" and SLURM (`scontrol show job -o`, one call for all
jobs) only adds what the files cannot say: pending, running, failed, cancelled, and which array task failed.
A job SLURM no longer knows is shown as `gone`; its phase is then done or not by its files alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from grpo_kd.config import Config
from grpo_kd.fsutil import atomic_write_json
from grpo_kd.paths import RunPaths
from grpo_kd.slurm.plan import Step, chain_steps, step_done

JOBS_FILE = "jobs.json"
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}  # fmt: skip
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_FIELD = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|ExitCode|Restarts)=(\S*)")


# ---------------------------------------------------------------------------------------------- jobs.json


@dataclass
class JobRecord:
    """One submission of one step."""

    step: str  # Step.key, e.g. "iter_0001/cache-teacher"
    iteration: int
    phase: str
    job_id: str
    tasks: int  # array tasks (1: not an array)
    script: str
    log: str  # the --output pattern, with %j or %A_%a
    submitted: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @staticmethod
    def load_all(paths: RunPaths) -> list["JobRecord"]:
        import json

        path = paths.slurm / JOBS_FILE
        if not path.is_file():
            return []
        return [JobRecord(**item) for item in json.loads(path.read_text(encoding="utf-8"))["jobs"]]

    @staticmethod
    def save_all(paths: RunPaths, records: list["JobRecord"]) -> None:
        atomic_write_json(paths.slurm / JOBS_FILE, {"version": 1, "jobs": [asdict(r) for r in records]})

    def log_path(self, task: str | None = None) -> Path:
        """The log of the job, or of one array task (`*` when none is named)."""
        text = self.log.replace("%A", self.job_id).replace("%j", self.job_id).replace("%a", task or "*")
        return Path(text.replace("%%", "%"))


def latest_jobs(records: list[JobRecord]) -> dict[str, JobRecord]:
    """The most recent submission of each step."""
    return {r.step: r for r in records}


# ---------------------------------------------------------------------------------------------- SLURM's view


@dataclass
class JobTask:
    """One job, or one task of an array, as `scontrol show job -o` describes it."""

    task: str | None  # array task id ("1", or "0-3%2" for tasks not started yet); None: not an array
    state: str
    reason: str
    exit_code: str
    restarts: int


def query_jobs() -> dict[str, list[JobTask]] | None:
    """`{job id: [tasks]}` of every job slurmctld knows (array tasks under their array's id); None without SLURM."""
    if shutil.which("scontrol") is None:
        return None
    done = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    jobs: dict[str, list[JobTask]] = {}
    for line in done.stdout.splitlines():
        fields = dict(_FIELD.findall(line))
        if "JobId" not in fields:
            continue
        key = fields.get("ArrayJobId") or fields["JobId"]
        task = fields.get("ArrayTaskId")
        restarts = int(fields.get("Restarts", "0") or 0)
        state = fields.get("JobState", "UNKNOWN")
        jobs.setdefault(key, []).append(JobTask(task, state, fields.get("Reason", ""), fields.get("ExitCode", ""), restarts))
    return jobs


def combine(tasks: list[JobTask]) -> tuple[str, JobTask]:
    """One state for a job or a whole array, and the task it comes from (a failed task first, then ...)."""
    for states in (FAILED, {"CANCELLED"}, {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING"}, ACTIVE):
        for task in tasks:
            if task.state in states:
                return task.state, task
    return tasks[0].state, tasks[0]


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class StepStatus:
    step: Step
    done: bool  # its outputs exist
    job_id: str | None  # the latest job submitted for it
    state: str  # SLURM's state; "-" (never submitted), "gone" (SLURM forgot it), "unknown" (no SLURM here)
    detail: str  # reason, exit code, restarts
    log: Path | None  # the job's (or the failed task's) log

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def failed(self) -> bool:
        cancelled_by_hand = self.state == "CANCELLED" and "Dependency" not in self.detail
        return not self.done and (self.state in FAILED or cancelled_by_hand)


def chain_status(cfg: Config, paths: RunPaths, jobs: dict[str, list[JobTask]] | None = ...) -> list[StepStatus]:
    """Each step of the run's chain with its files' and SLURM's state (`jobs` defaults to a live query)."""
    live = query_jobs() if jobs is ... else jobs
    records = latest_jobs(JobRecord.load_all(paths))
    rows = []
    for step in chain_steps(cfg):
        record = records.get(step.key)
        done = step_done(cfg, paths, step)
        if record is None:
            rows.append(StepStatus(step, done, None, "-", "", None))
            continue
        if live is None:
            rows.append(StepStatus(step, done, record.job_id, "unknown", "", record.log_path()))
            continue
        tasks = live.get(record.job_id)
        if not tasks:
            rows.append(StepStatus(step, done, record.job_id, "gone", "", record.log_path()))
            continue
        state, task = combine(tasks)
        rows.append(StepStatus(step, done, record.job_id, state, _detail(task), _task_log(record, task)))
    return rows


def _detail(task: JobTask) -> str:
    parts = []
    if task.reason and task.reason != "None":
        parts.append(task.reason)
    if task.exit_code and task.exit_code != "0:0":
        parts.append(f"exit {task.exit_code}")
    if task.restarts:
        parts.append(f"requeued {task.restarts}x")
    if task.task is not None and task.state in FAILED:
        parts.append(f"task {task.task}")
    return ", ".join(parts)


def _task_log(record: JobRecord, task: JobTask) -> Path:
    single = task.task if task.task is not None and task.task.isdigit() else None
    return record.log_path(single)


def describe_failures(rows: list[StepStatus]) -> list[str]:
    """One line per failed phase: what failed, and where its log is."""
    return [f"{r.step.label} {r.state} (job {r.job_id}{', ' + r.detail if r.detail else ''}); log: {r.log}"
            for r in rows if r.failed]  # fmt: skip
