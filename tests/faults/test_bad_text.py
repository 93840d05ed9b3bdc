"""Issue 13, case 4: input that is not UTF-8 text is one line naming the file and the line, before any work.

The prompts are read when a phase (or `grpo-kd run`) starts, so a bad byte stops the run before a model loads.
"""

from __future__ import annotations

import json
import re

import pytest

from grpo_kd.errors import GrpoKdError

FAROESE = ["Eg eri føddur í Havn og búgvi í Klaksvík nú.", "Tað var ein góður dagur á Sandoy í summar.",
           "Vit fóru til Tórshavnar við skipinum."] * 5


def _refused_rollout(cfg) -> str:
    from grpo_kd.paths import RunPaths
    from grpo_kd.train.phases import run_phase

    with pytest.raises(GrpoKdError) as refused:
        run_phase(cfg, "rollout", 1)
    assert not RunPaths.of(cfg.run_dir).rollouts(1).exists()
    return str(refused.value)


def _where(message: str, path) -> int:
    match = re.search(re.escape(str(path)) + r":(\d+): not UTF-8", message)
    assert match, message
    return int(match.group(1))


def test_a_binary_file_as_prompts(tmp_path, fault_config):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a first line\n" + bytes(range(256)) * 4)  # byte 0x0a ends line 2, 0x80 is on line 3
    assert _where(_refused_rollout(fault_config(**{"data.prompts": path})), path) == 3


def test_latin1_faroese_text_as_prompts(tmp_path, fault_config):
    path = tmp_path / "prompts.txt"
    path.write_bytes(("plain ascii first line here\n" + "\n".join(FAROESE)).encode("latin-1"))
    assert _where(_refused_rollout(fault_config(**{"data.prompts": path})), path) == 2


def test_one_bad_byte_in_a_utf8_file(tmp_path, fault_config):
    data = bytearray("\n".join(FAROESE).encode("utf-8"))
    third_line = data.index(FAROESE[2].encode("utf-8"))
    data[third_line + 5] = 0xFF
    path = tmp_path / "prompts.txt"
    path.write_bytes(bytes(data))
    message = _refused_rollout(fault_config(**{"data.prompts": path}))
    assert _where(message, path) == 3 and "0xff" in message


def test_latin1_jsonl(tmp_path, fault_config):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "ascii only"})] + [json.dumps({"prompt": t}, ensure_ascii=False) for t in FAROESE]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    assert _where(_refused_rollout(fault_config(**{"data.prompts": path, "data.format": "jsonl"})), path) == 2


def test_a_latin1_config_file_in_config_validate(tmp_path, capsys):
    from grpo_kd.cli.app import main

    path = tmp_path / "run.yaml"
    path.write_bytes("name: tórshavn\nseed: 1\n".encode("latin-1"))
    assert main(["config", "validate", str(path)]) == 1
    out = capsys.readouterr()
    assert _where(out.out, path) == 1 and len(out.err.strip().splitlines()) == 1


def test_a_latin1_corpus_for_tiny_models(tmp_path, capsys):
    from grpo_kd.cli.app import main

    path = tmp_path / "corpus.txt"
    path.write_bytes("\n".join(FAROESE).encode("latin-1"))
    assert main(["tiny-models", str(tmp_path / "models"), "--corpus", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and _where(err[0], path) == 1
