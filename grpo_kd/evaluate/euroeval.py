"""The bridge to EuroEval (https://euroeval.com), the European LLM benchmark, for its Faroese tasks.

Key design choice: EuroEval is an optional, heavy dependency (vLLM, many datasets), often installed in its own
environment, so grpo-kd never imports it: it runs EuroEval's command line on the checkpoint directory (which
EuroEval accepts as a local model) in a work directory of its own, then reads the
`euroeval_benchmark_results.jsonl` that EuroEval writes there and merges the numbers into the report. The command
is built by a pure function (`euroeval_command`), so it is testable without EuroEval installed.

    euroeval --model runs/x/checkpoints/iter_0003 --language fo [extra args]

`--dataset` cannot be combined with `--language` in EuroEval; when the extra args name a dataset, the language
is left out.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from grpo_kd.errors import GrpoKdError

RESULTS_FILE = "euroeval_benchmark_results.jsonl"
INSTALL_HINT = (
    "EuroEval is not installed: pip install euroeval (best in its own environment, with the `euroeval` command "
    "on PATH; it names any extra it needs); see docs/evaluation.md"
)


def euroeval_launcher() -> list[str] | None:
    """How to start EuroEval here: its console script, or `python -m euroeval.cli`; None when it is absent."""
    script = shutil.which("euroeval")
    if script:
        return [script]
    if importlib.util.find_spec("euroeval") is not None:
        return [sys.executable, "-m", "euroeval.cli"]
    return None


def euroeval_command(
    model: str, *, language: str = "fo", extra_args: Sequence[str] = (), launcher: Sequence[str] = ("euroeval",)
) -> list[str]:
    """The EuroEval command line for `model` (a local directory or hub id) on `language`'s datasets."""
    extra = list(extra_args)
    command = [*launcher, "--model", str(model)]
    names_dataset = any(arg == "--dataset" or arg.startswith("--dataset=") for arg in extra)
    if not names_dataset:
        command += ["--language", language]
    return command + extra


def parse_results(path: str | Path, model: str | None = None) -> dict[str, dict]:
    """`{dataset: {"task": ..., metric: value, ...}}` from EuroEval's results JSONL (the `results.total` numbers).

    With `model`, only records of that model are kept (EuroEval appends to the file across runs); the last
    record of a dataset wins.
    """
    merged: dict[str, dict] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise GrpoKdError(f"{path}:{number}: not valid JSON") from None
        if model is not None and record.get("model") not in (model, str(Path(model).resolve())):
            continue
        total = (record.get("results") or {}).get("total") or {}
        metrics = {k: v for k, v in total.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        merged[str(record.get("dataset", f"line{number}"))] = {"task": record.get("task"), **metrics}
    return merged


def run_euroeval(
    model: str, work_dir: str | Path, *, language: str = "fo", extra_args: Sequence[str] = (), timeout: float | None = None
) -> dict:
    """Run EuroEval on `model` in `work_dir` (where it writes its results and log) and return the parsed results."""
    launcher = euroeval_launcher()
    if launcher is None:
        raise GrpoKdError(INSTALL_HINT)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = str(Path(model).resolve()) if Path(model).exists() else model
    command = euroeval_command(model, language=language, extra_args=extra_args, launcher=launcher)
    with open(work_dir / "euroeval.log", "w", encoding="utf-8") as log:
        status = subprocess.run(command, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if status.returncode != 0:
        raise GrpoKdError(f"EuroEval exited with code {status.returncode}; see {work_dir / 'euroeval.log'}")
    results_file = work_dir / RESULTS_FILE
    if not results_file.is_file():
        raise GrpoKdError(f"EuroEval wrote no {RESULTS_FILE} in {work_dir}; see {work_dir / 'euroeval.log'}")
    return {"command": command, "datasets": parse_results(results_file, model)}
