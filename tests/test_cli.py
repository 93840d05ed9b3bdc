"""The command line as a user meets it: help everywhere, one clear line and a non-zero code on bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_kd.cli.app import main

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    ["run"], ["demo"], ["sft"], ["rollout"], ["cache-teacher"], ["update"], ["evaluate"], ["report"],
    ["chain", "submit"], ["chain", "status"], ["chain", "resume"], ["cache", "verify"], ["cache", "stats"],
    ["config", "show"], ["config", "validate"], ["bench"], ["tiny-models"], ["compare"], ["export"], ["plan"],
]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "grpo_kd.cli.app", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ["run", "demo", "sft", "rollout", "cache-teacher", "update", "evaluate", "report", "chain", "cache",
                 "config", "bench", "compare", "export"]:
        assert name in out.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and len(out.splitlines()) > 3


def test_config_validate_passes_on_shipped_configs(capsys):
    files = [str(p) for p in sorted((ROOT / "configs").glob("**/*.yaml"))]  # experiments/ included
    assert any("experiments" in f for f in files)
    assert main(["config", "validate", "--schema-only", *files]) == 0  # their models are not on this machine
    assert capsys.readouterr().out.count("ok ") == len(files)


def test_config_validate_names_a_misspelt_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  betaa: 0.1\n", encoding="utf-8")
    assert main(["config", "validate", str(ROOT / "configs" / "tiny.yaml"), str(bad)]) == 1
    out = capsys.readouterr()
    assert "unknown config key loss.betaa; did you mean loss.policy.beta?" in out.out


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "--config", str(ROOT / "configs" / "tiny.yaml"), "loss.policy.beta=0.25"]) == 0
    out = capsys.readouterr().out
    assert "beta: 0.25" in out and "name: tiny" in out


def test_bad_override_is_one_line_on_stderr():
    out = subprocess.run(
        [sys.executable, "-m", "grpo_kd.cli.app", "config", "show", "loss.betaa=1"], capture_output=True, text=True
    )
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown config key loss.betaa; did you mean loss.policy.beta?"]


def test_error_lines_keep_square_brackets(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  policy:\n    loss_type: '[dapo]'\n", encoding="utf-8")
    assert main(["config", "show", "--config", str(bad)]) == 1
    assert "'[dapo]' is not one of" in capsys.readouterr().err
