"""The one atomic writer: a crash between writing and renaming leaves the old output intact, for every kind of
output the project writes; and no module but grpo_kd/fsutil.py renames files.

The crash is simulated where it matters: `os.replace` of a temporary (`*.tmp-<pid>`) over its final name raises a
BaseException, as a kill at that instant would stop the writer (nothing after the rename runs).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from grpo_kd.cache.manifest import list_shard_manifests, shard_data_path, shard_is_complete, write_shard_manifest
from grpo_kd.cache.rollouts import RolloutStore, write_rollout_shard
from grpo_kd.cache.spec import CacheSpec
from grpo_kd.evaluate.report import save_evaluation
from grpo_kd.fsutil import atomic_path, atomic_write_text
from grpo_kd.models import load_causal_lm
from grpo_kd.paths import RunPaths
from grpo_kd.train.checkpoint import save_checkpoint

from .cache.test_formats import VOCAB, toy_records, write_cache

ROOT = Path(__file__).resolve().parents[1]


class Crash(BaseException):
    """The writer was killed at the rename."""


@pytest.fixture
def crash_at_rename(monkeypatch):
    """Call it to make every rename of a temporary over its final name fail, as a kill would."""
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            raise Crash(f"killed before renaming {src}")
        return real(src, dst)

    return lambda: monkeypatch.setattr(os, "replace", replace)


def tree_digest(path: Path) -> str:
    """sha256 over the names and bytes of a file or of every file below a directory."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def leftovers(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_replacing_a_file_or_a_directory(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    store = tmp_path / "store"
    for version in ("one", "two"):
        with atomic_path(store) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text(version)
    assert (store / "data").read_text() == "two" and leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_manifest(tmp_path, crash_at_rename):
    write_shard_manifest(tmp_path, 0, {"rows": 1})
    before = tree_digest(tmp_path / "part-00000.manifest.json")
    crash_at_rename()
    with pytest.raises(Crash):
        write_shard_manifest(tmp_path, 0, {"rows": 2})
    assert tree_digest(tmp_path / "part-00000.manifest.json") == before
    assert list_shard_manifests(tmp_path)[0]["rows"] == 1


def test_rollout_shard(tmp_path, crash_at_rename):
    """A shard being redone stops looking finished (its manifest goes first), but its old data stays intact."""
    directory = RunPaths.of(tmp_path).rollouts(1)
    write_rollout_shard(directory, 0, toy_records(range(3)), meta={"student": VOCAB})
    data = shard_data_path(directory, 0, "arrow")
    before = tree_digest(data)
    crash_at_rename()
    with pytest.raises(Crash):
        write_rollout_shard(directory, 0, toy_records(range(3), seed=5), meta={"student": VOCAB})
    assert tree_digest(data) == before
    assert not shard_is_complete(directory, 0, "arrow")


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_teacher_shard(tmp_path, crash_at_rename, fmt):
    write_rollout_shard(RunPaths.of(tmp_path).rollouts(1), 0, toy_records(range(3)), meta={"student": VOCAB})
    spec = CacheSpec(format=fmt, top_k=4)
    write_cache(tmp_path, spec)
    directory = RunPaths.of(tmp_path).teacher(1)
    data = shard_data_path(directory, 0, fmt)
    before = tree_digest(data)
    crash_at_rename()
    with pytest.raises(Crash):
        write_cache(tmp_path, CacheSpec(format=fmt, top_k=4, reference=True))
    assert tree_digest(data) == before
    assert not shard_is_complete(directory, 0, fmt)


def test_checkpoint(tmp_path, tiny_models_quick, crash_at_rename):
    """Checkpoints are never rewritten: a crash while writing the next one leaves the last one as it was."""
    model = load_causal_lm(str(tiny_models_quick.student))
    first = save_checkpoint(tmp_path / "iter_0001", model=model, state={"step": 1})
    before = tree_digest(first)
    crash_at_rename()
    with pytest.raises(Crash):
        save_checkpoint(tmp_path / "iter_0002", model=model, state={"step": 2})
    assert tree_digest(first) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0001"]  # no half checkpoint, no temporary


def test_evaluation_report(tmp_path, crash_at_rename):
    result = {"perplexity": {"perplexity": 12.5, "nll_per_token": 2.5}}
    paths = save_evaluation(result, tmp_path, "initial")
    before = {suffix: tree_digest(path) for suffix, path in paths.items()}
    crash_at_rename()
    with pytest.raises(Crash):
        save_evaluation({"perplexity": {"perplexity": 99.0, "nll_per_token": 4.6}}, tmp_path, "initial")
    assert {suffix: tree_digest(path) for suffix, path in paths.items()} == before


def test_no_module_but_fsutil_renames_files():
    """Every finished file goes through fsutil.atomic_path: a second tmp + rename is where the next bug hides."""
    rename = re.compile(r"\bos\.(replace|rename|renames)\(|shutil\.move\(|\.rename\(")
    offenders = []
    for path in sorted((ROOT / "grpo_kd").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")):
        if path.name == "fsutil.py" and path.parent.name == "grpo_kd":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if rename.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
