"""Fixtures of the fault tests (issue 13): a small config of the tiny loop, and one finished run to damage.

- `fault_config(tmp_path, **sections)` -> `Config` of the tiny loop in `tmp_path/runs/run` (8 prompts x 4 completions,
  one update of 2 optimizer steps per iteration): seconds per phase, in this process.
- `finished_run` (session) -> `RunPaths` of a run with two finished iterations, built once, never changed;
  `damaged_copy(tmp_path)` copies it (the tests damage the copy).

Helpers (the config, running the loop, damaging a file) are in helpers.py. The models are the session's
`tiny_models_quick` (random weights: the faults do not need a trained pair).
The tests call the entry points that existed before the fixes (`run_phase`, `run_local`, the command line's
`main`, the readers), so that each one fails on the code as it was for the reason its case names.
"""

from __future__ import annotations

import shutil

import pytest

from .helpers import make_config, run_all


@pytest.fixture
def fault_config(tmp_path, tiny_models_quick):
    def make(**sections):
        return make_config(tmp_path / "runs", tiny_models_quick, **sections)

    return make


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_models_quick):
    from grpo_kd.paths import RunPaths

    root = tmp_path_factory.mktemp("finished-run")
    run_all(make_config(root / "runs", tiny_models_quick), iterations=2)
    return RunPaths.of(root / "runs" / "run")


@pytest.fixture
def damaged_copy(tmp_path, finished_run, tiny_models_quick):
    """A copy of `finished_run` under tmp_path/runs/run and the config that runs it (iterations=2)."""
    from grpo_kd.paths import RunPaths

    target = tmp_path / "runs" / "run"
    shutil.copytree(finished_run.root, target)
    cfg = make_config(tmp_path / "runs", tiny_models_quick, iterations=2)
    return cfg, RunPaths.of(target)
