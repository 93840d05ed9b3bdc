"""The stop flag under a real signal, and a metrics log that survives a kill and a resume."""

import os
import signal

from grpo_kd.train.metrics import MetricsLog
from grpo_kd.train.signals import stop_on_signals


def test_sigusr2_and_sigterm_set_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR2)
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        with stop_on_signals() as stop:
            assert not stop.requested
            os.kill(os.getpid(), sig)
            assert stop.requested and stop.signal_name == sig.name
    assert signal.getsignal(signal.SIGUSR2) == before


def test_metrics_truncate_after_resume_point(tmp_path):
    log = MetricsLog(tmp_path / "logs" / "metrics.jsonl")
    for it, step in [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]:
        log.log({"iteration": it, "step": step, "loss": float(step)})
    with open(log.path, "a") as handle:
        handle.write('{"iteration": 2, "st')  # a line cut by a kill
    log.truncate_after(iteration=2, step=1)
    assert [(r["iteration"], r["step"]) for r in log.read()] == [(1, 1), (1, 2), (2, 1)]
    log.log({"iteration": 2, "step": 2, "kl": float("nan")})
    assert log.read()[-1]["kl"] == "nan"
