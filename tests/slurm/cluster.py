"""A real single-node SLURM for the tests: Debian's munge, slurmctld and slurmd, with all state in a temp dir.

Key design choice: nothing system-wide is touched beyond installing the packages. munged gets its own socket,
slurmctld/slurmd their own ports, spool and state directories, and the clients find the cluster through
`SLURM_CONF`; every daemon is started here and stopped by its process id. The node offers this machine's CPUs and
no GPUs. `AuthInfo=cred_expire=10` cuts the requeue delay from two minutes (SLURM's default) to ten seconds.

    python tests/slurm/cluster.py install     # what .ci/run calls: apt-get install when the binaries are missing
    python tests/slurm/cluster.py up          # start one by hand (prints SLURM_CONF; Ctrl-C stops it)
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "munged"]
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmUnavailable(RuntimeError):
    """Why a local SLURM cannot run here (the tests skip with this message)."""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def ensure_installed(install: bool = True) -> None:
    """Install the packages with apt-get when a binary is missing; raise `SlurmUnavailable` when that cannot be."""
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable("a local SLURM needs Linux")
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local SLURM needs root (slurmd launches jobs, munged runs as the munge user)")
    if not missing_binaries():
        return
    if not install or shutil.which("apt-get") is None:
        missing = ", ".join(missing_binaries())
        raise SlurmUnavailable(f"SLURM is not installed ({missing} missing) and apt-get is unavailable")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {tail[0]}")
    if missing_binaries():
        raise SlurmUnavailable(f"after apt-get install, still missing: {', '.join(missing_binaries())}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512
    return 2048


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` holds what a client needs (`SLURM_CONF`)."""

    def __init__(self, root: Path | None = None, cpus: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="grpo-kd-slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------------------------------- start/stop

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        ensure_installed()
        self.root.chmod(0o755)  # munged (as the munge user) must reach its directory
        self._start_munged()
        self._write_conf()
        env = {**os.environ, **self.env}
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.stdout", "wb")
            cmd = [_sbin(daemon), "-D", "-f", str(self.conf)]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
            if daemon == "slurmctld":
                self._wait_for(lambda: self._client_ok(["scontrol", "ping"], "UP"), timeout, "slurmctld to answer")
        self._wait_for(lambda: self._client_ok(["sinfo", "-h", "-o", "%T"], "idle"), timeout, "the node to be idle")
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _start_munged(self) -> None:
        if not MUNGE_KEY.is_file():
            cmd = [_sbin("mungekey"), "--create", "--keyfile", str(MUNGE_KEY)]
            subprocess.run(cmd, check=True, capture_output=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, exist_ok=True)
        munge_dir.chmod(0o755)
        shutil.chown(munge_dir, "munge", "munge")
        user = pwd.getpwnam("munge")
        cmd = [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            _sbin("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={MUNGE_KEY}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ]
        log = open(self.root / "munged.stdout", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        self._wait_for(self.munge_socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        lines = [
            "ClusterName=grpokdtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=5",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------------- helpers

    def _client_ok(self, cmd: list[str], expect: str) -> bool:
        done = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True)
        return done.returncode == 0 and expect in done.stdout

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        self.stop()
        logs = " ".join(str(p) for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")))
        raise SlurmUnavailable(f"timed out waiting for {what} (logs: {logs})")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "install"
    try:
        if command == "install":
            ensure_installed()
            print("SLURM is installed")
        elif command == "up":
            cluster = LocalSlurm().start()
            print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C (or SIGTERM) stops the daemons", flush=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: cluster.stop() or sys.exit(0))
            while True:
                signal.pause()
        else:
            print(f"usage: {sys.argv[0]} install|up", file=sys.stderr)
            return 2
    except SlurmUnavailable as exc:
        print(f"local SLURM unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
