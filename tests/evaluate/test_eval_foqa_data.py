"""FoQA loading (JSON, nested SQuAD, JSONL, Parquet, saved datasets, hub failures), shots and the prompt."""

import json

import pytest

from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate.foqa import build_prompt, choose_shots, load_qa, split_shots


def test_jsonl_with_every_answer_layout(foqa_file):
    examples = load_qa(str(foqa_file))
    assert [e.answers for e in examples[:4]] == [("Tórshavn",), ("á Borðoy", "Borðoy"), ("28. og 29. juli",), ("átjan",)]
    assert examples[0].id == "fo-1" and examples[0].question == "Hvat er høvuðsstaðurin í Føroyum?"


def test_json_list_nested_squad_and_parquet(tmp_path, foqa_records):
    (tmp_path / "a.json").write_text(json.dumps({"data": foqa_records}, ensure_ascii=False), encoding="utf-8")
    assert len(load_qa(str(tmp_path / "a.json"))) == len(foqa_records)
    nested = {"data": [{"title": "Føroyar", "paragraphs": [{"context": "Føroyar eru átjan oyggjar.", "qas": [
        {"id": "q1", "question": "Hvussu nógvar oyggjar?", "answers": [{"text": "átjan", "answer_start": 12}]}]}]}]}
    (tmp_path / "b.json").write_text(json.dumps(nested, ensure_ascii=False), encoding="utf-8")
    (example,) = load_qa(str(tmp_path / "b.json"))
    assert example.answers == ("átjan",) and example.context == "Føroyar eru átjan oyggjar."
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"context": r["context"], "question": r["question"], "answers": {"text": ["x"], "answer_start": [0]}} for r in foqa_records]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert load_qa(str(tmp_path / "c.parquet"), limit=2)[1].answers == ("x",)


def test_saved_dataset_splits(tmp_path, foqa_records):
    import datasets

    rows = [{k: r[k] for k in ("id", "context", "question")} | {"answers": {"text": ["a"], "answer_start": [0]}} for r in foqa_records]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]), "val": datasets.Dataset.from_list(rows[3:])})
    dd.save_to_disk(str(tmp_path / "foqa"))
    assert len(load_qa(str(tmp_path / "foqa"), split="validation")) == 3  # "validation" finds "val"
    with pytest.raises(GrpoKdError, match="no split 'test'; splits present: train, val"):
        load_qa(str(tmp_path / "foqa"), split="test")


def test_bad_inputs_are_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "question": "y"}\n', encoding="utf-8")
    with pytest.raises(GrpoKdError, match="FoQA needs context, question and answers; fields present: context, question"):
        load_qa(str(bad))
    with pytest.raises(GrpoKdError, match="FoQA file not found"):
        load_qa(str(tmp_path / "missing.jsonl"))

    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'alexandrainst/foqa' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(GrpoKdError) as info:
        load_qa("alexandrainst/foqa")
    assert "\n" not in str(info.value) and "gated without a token" in str(info.value)


def test_shots_have_short_answers_and_leave_the_evaluation(foqa_file):
    examples = load_qa(str(foqa_file))
    shots = choose_shots(examples, 10)
    assert all(len(s.answers[0].split()) <= 3 for s in shots)
    assert "fo-3" not in {s.id for s in shots}  # "28. og 29. juli" has four words
    shots, evaluated = split_shots(examples, 2, None)
    assert len(shots) == 2 and len(evaluated) == len(examples) - 2
    assert not {s.id for s in shots} & {e.id for e in evaluated}


def test_prompt_in_the_euroeval_manner(foqa_file):
    examples = load_qa(str(foqa_file))
    prompt = build_prompt(examples[1], [examples[0]])
    assert prompt == (
        "Hetta eru tekstir saman við spurningum og svar.\n\n"
        "Tekstur: Tórshavn er høvuðsstaðurin í Føroyum. Býurin liggur á Streymoy.\n"
        "Spurningur: Hvat er høvuðsstaðurin í Føroyum?\n"
        "Svara við í mesta lagi trimum orðum: Tórshavn\n\n"
        "Tekstur: Klaksvík er næststørsti býurin í Føroyum. Hann liggur á Borðoy.\n"
        "Spurningur: Hvar liggur Klaksvík?\n"
        "Svara við í mesta lagi trimum orðum:"
    )
