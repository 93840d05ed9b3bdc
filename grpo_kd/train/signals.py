"""Stop a long phase cleanly on SIGTERM, SIGUSR2 or SIGHUP: finish the current step, checkpoint, exit with a known
code.

SLURM sends SIGUSR2 (`--signal=B:USR2@SECONDS`) to the batch script shortly before the time limit; the script
forwards it to the phase, waits for it, and requeues the job when the phase exits with `REQUEUE_EXIT_CODE`.
SIGHUP (the terminal of an update started by hand was closed) is a stop request like SIGTERM, not a kill.
SIGUSR1 is left alone because NCCL may install its own handler for it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpointed, run me again"; the sbatch scripts requeue on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)


class StopFlag:
    """Set by a stop signal; the training loop checks `stop.requested` between optimizer steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: will checkpoint after the current step and exit", self.signal_name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of a phase and restore the previous ones after."""
    flag = StopFlag()
    previous = {sig: signal.signal(sig, flag._handle) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
