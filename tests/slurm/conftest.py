"""The fixture of the orchestration tests: a real local SLURM, started once per session.

`local_slurm` installs the SLURM packages when they are missing (as root, with apt-get), starts munged,
slurmctld and slurmd with their state in a temporary directory (tests/slurm/cluster.py), points the clients at
it through SLURM_CONF, and stops the daemons at the end of the session. Where that cannot be done (not root, no
apt-get, a daemon that does not come up) every test that uses it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import LocalSlurm, SlurmUnavailable  # noqa: E402


@pytest.fixture(scope="session")
def local_slurm():
    if os.environ.get("GRPO_KD_SKIP_SLURM"):
        pytest.skip("GRPO_KD_SKIP_SLURM is set")
    cluster = LocalSlurm()  # in /tmp: munged, as the munge user, cannot enter pytest's private tmp dirs
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM: {exc}")
    previous = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
