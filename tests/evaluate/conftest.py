"""Fixtures for the evaluation tests: tiny models, Faroese text, and a small FoQA-format file written here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Faroese reading-comprehension examples written for these tests (SQuAD fields, three answer layouts).
FOQA_RECORDS = [
    {"id": "fo-1", "context": "Tórshavn er høvuðsstaðurin í Føroyum. Býurin liggur á Streymoy.",
     "question": "Hvat er høvuðsstaðurin í Føroyum?", "answers": {"text": ["Tórshavn"], "answer_start": [0]}},
    {"id": "fo-2", "context": "Klaksvík er næststørsti býurin í Føroyum. Hann liggur á Borðoy.",
     "question": "Hvar liggur Klaksvík?", "answers": {"text": ["á Borðoy", "Borðoy"], "answer_start": [54, 56]}},
    {"id": "fo-3", "context": "Ólavsøka verður hildin í Tórshavn hvørt ár 28. og 29. juli.",
     "question": "Nær verður Ólavsøka hildin?", "answers": ["28. og 29. juli"]},
    {"id": "fo-4", "context": "Føroyar eru átjan oyggjar í Norðuratlantshavi.",
     "question": "Hvussu nógvar oyggjar eru Føroyar?", "answers": [{"text": "átjan"}]},
    {"id": "fo-5", "context": "Slættaratindur er hægsta fjallið í Føroyum, 880 metrar til hædd.",
     "question": "Hvat er hægsta fjallið í Føroyum?", "answers": {"text": ["Slættaratindur"], "answer_start": [0]}},
    {"id": "fo-6", "context": "Jóannes Patursson var bóndi í Kirkjubø og politikkur.",
     "question": "Hvar var Jóannes Patursson bóndi?", "answers": {"text": ["í Kirkjubø"], "answer_start": [31]}},
]

HELDOUT_TEXT = [
    "Tórshavn er høvuðsstaðurin í Føroyum, og har búgva flestu føroyingar.",
    "Eg eri glaður í dag, tí sólin skínur á oyggjarnar og havið er kvirt.",
    "Seyðurin gekk á bønum, og bóndin fór niður til sjóvar at fiska.",
    "Ólavsøka er tjóðhátíð føroyinga, og hon verður hildin í juli.",
]


@pytest.fixture(scope="session")
def eval_models(request, tmp_path_factory):
    """The shared `tiny_models` fixture when the suite has one, else a small build of our own."""
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        from grpo_kd.tiny import build_tiny_models

        root = os.environ.get("GRPO_KD_TEST_MODELS") or tmp_path_factory.mktemp("tiny-models")
        return build_tiny_models(Path(root), pretrain_steps=40)


@pytest.fixture
def faroese_data(request) -> Path:
    """../shared/data/faroese (the shared `faroese_dir` fixture when there is one); skips when absent."""
    try:
        return request.getfixturevalue("faroese_dir")
    except pytest.FixtureLookupError:
        path = ROOT.parent / "shared" / "data" / "faroese"
        if not path.is_dir():
            pytest.skip("../shared/data/faroese is not present")
        return path


@pytest.fixture
def foqa_records() -> list[dict]:
    return [dict(r) for r in FOQA_RECORDS]


@pytest.fixture
def foqa_file(tmp_path) -> Path:
    path = tmp_path / "foqa.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in FOQA_RECORDS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def heldout_file(tmp_path) -> Path:
    path = tmp_path / "heldout.txt"
    path.write_text("\n".join(HELDOUT_TEXT) + "\n", encoding="utf-8")
    return path
