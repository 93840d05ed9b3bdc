"""Locks that keep two processes from doing the same work in one run directory: `RUN/locks/<name>.lock`.

    with hold_lock(paths.lock("run"), "grpo-kd run"):               # the executor: one per run directory
        ...
    with hold_lock(paths.lock("iter_0001-update"), "iteration 1 update"):   # one per phase task
        ...

Key design choice: the lock is `fcntl.flock` on the file, not the file's existence. The kernel releases a flock
when its holder dies, however it dies (SIGKILL, a crashed node's NFS lease running out), so a lock can never be
left held by a dead process; Linux maps flock to POSIX record locks on NFS, so it holds across the nodes of a
cluster too. The file holds JSON about its holder (pid, host, command, start time, SLURM job id): a second process
is refused with one line naming the holder, and a file whose holder is gone without releasing it (killed) is
taken over with a message saying whose it was. The file is emptied on release, never deleted (deleting a locked
file lets two processes lock two different files of one name).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)


class LockHeld(GrpoKdError):
    """Another live process holds the lock; the message names it."""


def holder_info() -> dict[str, Any]:
    """Who this process is, as the lock file records it."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        info["slurm_job_id"] = job + (f"_{os.environ['SLURM_ARRAY_TASK_ID']}"
                                      if os.environ.get("SLURM_ARRAY_TASK_ID") else "")
    return info


def describe_holder(info: dict[str, Any] | None) -> str:
    """`pid 123 on node7 (SLURM job 456), since 2025-01-01 12:00:00: grpo-kd update ...` for messages."""
    if not info:
        return "a process that left no details"
    job = f" (SLURM job {info['slurm_job_id']})" if info.get("slurm_job_id") else ""
    return (f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}: "
            f"{str(info.get('command', '')).strip() or '?'}")


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    if not data.strip():
        return None
    try:
        info = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return {"command": "(unreadable lock details)"}
    return info if isinstance(info, dict) else None


def _write(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info, sort_keys=True) + "\n").encode("utf-8"))
    os.fsync(fd)


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, what: str) -> Iterator[dict[str, Any]]:
    """Hold the lock file `path` for the block; `what` names the work in the refusal ("iteration 1 update").

    Raises `LockHeld` (one line naming the holder) when a live process holds it. Yields this holder's details."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (O_CLOEXEC by default)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise LockHeld(f"{what} is already running: {describe_holder(holder)} (lock {path}); wait for it to "
                       "finish or stop it first") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        previous = _read(fd)
        if previous:
            log.warning("taking over the lock %s left by %s, which stopped without releasing it", path,
                        describe_holder(previous))
        info = holder_info()
        _write(fd, info)
        yield info
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released cleanly: nothing to take over
        os.close(fd)  # closing the descriptor releases the flock
