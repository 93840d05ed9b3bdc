"""A config file for the tiny loop, as the orchestration tests write it (`from run_config import write_run_config`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "grpo_kd" / "assets" / "builtin_corpus.txt"
SMALL_JOB = {"gpus_per_node": 0, "cpus_per_task": 1, "mem": "500M", "time": "10:00"}  # a job of the test node


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


def broken_teacher(directory: Path, tiny_models) -> Path:
    """A copy of the tiny teacher whose weights are cut short: it passes the checks made before the first phase
    (its directory, config and tokenizer are there) and fails when cache-teacher loads it."""
    teacher = directory / "broken-teacher"
    shutil.copytree(tiny_models.teacher, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return teacher
