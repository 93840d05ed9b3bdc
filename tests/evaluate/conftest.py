"""Fixtures for the evaluation tests: a small FoQA-format file and held-out Faroese text written here.

The models (`tiny_models`) and the shared Faroese data (`faroese_dir`) come from the root conftest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
