"""The EuroEval bridge without EuroEval: the command builder, the results parser, a fake CLI, the install hint."""

import json
import os
import stat

import pytest

from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate import euroeval as ee


def test_command_for_faroese():
    assert ee.euroeval_command("runs/x/checkpoints/iter_0002") == [
        "euroeval", "--model", "runs/x/checkpoints/iter_0002", "--language", "fo"]
    command = ee.euroeval_command("m", extra_args=["--num-iterations", "1", "--task", "reading-comprehension"],
                                  launcher=["python", "-m", "euroeval.cli"])
    assert command == ["python", "-m", "euroeval.cli", "--model", "m", "--language", "fo",
                       "--num-iterations", "1", "--task", "reading-comprehension"]


def test_a_named_dataset_drops_the_language():
    # EuroEval refuses --dataset together with --language
    assert ee.euroeval_command("m", extra_args=["--dataset", "foqa"]) == ["euroeval", "--model", "m", "--dataset", "foqa"]


def test_parse_results_keeps_the_model_and_the_totals(tmp_path):
    lines = [
        {"dataset": "foqa", "task": "reading-comprehension", "model": "other", "results": {"total": {"test_f1": 1.0}}},
        {"dataset": "foqa", "task": "reading-comprehension", "model": "m",
         "results": {"raw": [{"test_f1": 40.0}], "total": {"test_f1": 41.5, "test_f1_se": 2.0, "test_em": 30.0, "note": "x"}}},
        {"dataset": "fosent", "task": "sentiment-classification", "model": "m", "results": {"total": {"test_mcc": 12.0}}},
    ]
    path = tmp_path / ee.RESULTS_FILE
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    assert ee.parse_results(path, "m") == {
        "foqa": {"task": "reading-comprehension", "test_f1": 41.5, "test_f1_se": 2.0, "test_em": 30.0},
        "fosent": {"task": "sentiment-classification", "test_mcc": 12.0},
    }


def test_run_euroeval_with_a_fake_cli(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "euroeval"
    fake.write_text(
        "#!/bin/sh\n"
        "echo \"$@\" > args.txt\n"
        "printf '%s\\n' '{\"dataset\": \"foqa\", \"task\": \"rc\", \"model\": \"hub/model\", "
        "\"results\": {\"total\": {\"test_f1\": 12.5}}}' > euroeval_benchmark_results.jsonl\n",
        encoding="utf-8",
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = ee.run_euroeval("hub/model", tmp_path / "work", extra_args=["--num-iterations", "1"])
    assert result["datasets"] == {"foqa": {"task": "rc", "test_f1": 12.5}}
    assert (tmp_path / "work" / "args.txt").read_text().split() == [
        "--model", "hub/model", "--language", "fo", "--num-iterations", "1"]


def test_missing_euroeval_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ee, "euroeval_launcher", lambda: None)
    with pytest.raises(GrpoKdError, match="pip install euroeval"):
        ee.run_euroeval("m", "unused")
