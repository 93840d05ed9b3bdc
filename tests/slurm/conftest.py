"""Fixtures of the orchestration tests: a real local SLURM (once per session), and a tiny run config.

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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import LocalSlurm, SlurmUnavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "grpo_kd" / "assets" / "builtin_corpus.txt"
SMALL_JOB = {"gpus_per_node": 0, "cpus_per_task": 1, "mem": "500M", "time": "10:00"}


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


def write_run_config(path: Path, output_dir: Path, tiny_models, **sections) -> Path:
    """A config for the tiny loop: small enough that a phase takes seconds; `sections` update its sections."""
    raw = {
        "name": "run",
        "output_dir": str(output_dir),
        "iterations": 1,
        "model": {"path": str(tiny_models.student)},
        "teacher": {"path": str(tiny_models.teacher), "top_k": 8},
        "data": {"prompts": str(CORPUS), "format": "text", "prefix_words": 4},
        "rollout": {"prompts_per_iteration": 8, "group_size": 4, "max_new_tokens": 12, "batch_size": 8},
        "optim": {"lr": 1.0e-4, "micro_batch_size": 8},
        "slurm": {"rollout": dict(SMALL_JOB), "cache_teacher": dict(SMALL_JOB), "update": dict(SMALL_JOB)},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                node = raw.setdefault(key, {})
                if isinstance(item, dict) and isinstance(node.get(sub), dict):
                    node[sub].update(item)
                else:
                    node[sub] = item
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path
