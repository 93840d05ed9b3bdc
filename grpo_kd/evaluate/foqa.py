"""FoQA: Faroese extractive question answering, few-shot and greedy, in the manner of EuroEval.

Data: SQuAD-style records with `context`, `question` and `answers`, where `answers` is the Hugging Face form
`{"text": [...], "answer_start": [...]}`, a list of strings, a list of `{"text": ...}` objects, or one string
(`answer` is accepted too). Sources: a local `.json` (a list of records, or `{"data": [...]}`, also the nested
SQuAD v1 form with `paragraphs`/`qas`), `.jsonl` or `.parquet` file; a directory saved with `save_to_disk`; or a
hub dataset by name (`alexandrainst/foqa`, gated: needs `huggingface-cli login` and a reachable hub), loaded
with `datasets`. Any failure is one line.

Prompt (EuroEval's Faroese reading-comprehension template for base models):

    Hetta eru tekstir saman við spurningum og svar.

    Tekstur: {context}
    Spurningur: {question}
    Svara við í mesta lagi trimum orðum: {answer}

    ... k examples, then the query with its answer left open.

The k few-shot examples come from the train split (hub / saved datasets), from `eval.foqa_train`, or else from
the first examples of the evaluated file, which are then left out of the evaluation. Only examples whose first
answer has at most three words are used as shots (the prompt asks for three words), shortest contexts first
within a seeded shuffle, so that the prompt fits a small model's context. Decoding is greedy, in batches;
the prediction is the generated text up to the first newline, stripped. Scores: `qa.qa_scores` (EM, F1).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate.generation import generate
from grpo_kd.evaluate.qa import mean_qa_scores, qa_scores
from grpo_kd.evaluate.scoring import max_positions
from grpo_kd.fsutil import read_text_utf8

PROMPT_PREFIX = "Hetta eru tekstir saman við spurningum og svar."
PROMPT_TEMPLATE = "Tekstur: {context}\nSpurningur: {question}\nSvara við í mesta lagi trimum orðum:"
MAX_SHOT_ANSWER_WORDS = 3
EXAMPLES_IN_REPORT = 20


@dataclass(frozen=True)
class QAExample:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- loading


def _answers(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, dict):
        raw = raw.get("text", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) and hasattr(raw, "tolist"):  # numpy arrays from Parquet / datasets
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise GrpoKdError(f"{where}: answers must be a list, a string or {{'text': [...]}}, got {type(raw).__name__}")
    return tuple(a["text"] if isinstance(a, dict) else str(a) for a in raw)


def example_from_record(record: dict, index: int, source: str) -> QAExample:
    where = f"{source}: record {index}"
    missing = [key for key in ("context", "question") if key not in record]
    if missing or ("answers" not in record and "answer" not in record):
        fields = ", ".join(map(str, record)) or "none"
        raise GrpoKdError(f"{where}: FoQA needs context, question and answers; fields present: {fields}")
    answers = _answers(record["answers"] if "answers" in record else record["answer"], where)
    return QAExample(id=str(record.get("id", index)), context=str(record["context"]),
                     question=str(record["question"]), answers=answers)


def _flatten_squad(data: list[dict]) -> list[dict]:
    """Nested SQuAD v1 (`data[].paragraphs[].qas[]`) -> flat records; flat records pass through."""
    if not data or "paragraphs" not in data[0]:
        return data
    records = []
    for article in data:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                records.append({"id": qa.get("id", len(records)), "context": paragraph["context"],
                                "question": qa["question"], "answers": qa.get("answers", [])})
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as exc:
        raise GrpoKdError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise GrpoKdError(f"{path}: expected a list of records or {{'data': [...]}}")
    return _flatten_squad(data)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(read_text_utf8(path).splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise GrpoKdError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
    return records


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise GrpoKdError(f"{path}: not a readable Parquet file: {exc}") from None


def _pick_split(data, split: str, source: str):
    import datasets  # 1.0-1.5 s (pandas included): only for FoQA from the hub or saved

    if not isinstance(data, datasets.DatasetDict):
        return data
    aliases = {"validation": ("validation", "val", "dev"), "val": ("val", "validation", "dev")}
    for name in aliases.get(split, (split,)):
        if name in data:
            return data[name]
    raise GrpoKdError(f"{source}: no split {split!r}; splits present: {', '.join(data)}")


def _read_dataset(source: str, split: str) -> list[dict]:
    import datasets  # 1.0-1.5 s (pandas included): only for FoQA from the hub or saved

    if Path(source).is_dir():
        try:
            data = datasets.load_from_disk(source)
        except (FileNotFoundError, ValueError) as exc:
            raise GrpoKdError(f"{source}: not a dataset saved with save_to_disk: {exc}") from None
        return _pick_split(data, split, source).to_list()
    try:
        data = datasets.load_dataset(source)
    except Exception as exc:  # unreachable hub, gated without a token, no such dataset: many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GrpoKdError(
            f"could not load FoQA {source!r} (not a local file; hub unreachable, gated without a token, "
            f"or no such dataset): {first}"
        ) from None
    return _pick_split(data, split, source).to_list()


def load_qa(source: str, *, split: str = "validation", limit: int | None = None) -> list[QAExample]:
    """SQuAD-style examples from a local JSON / JSONL / Parquet file, a saved dataset, or a hub dataset."""
    path = Path(source).expanduser()
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    if path.is_file():
        if path.suffix.lower() not in readers:
            raise GrpoKdError(f"{source}: FoQA files must be .json, .jsonl or .parquet")
        records = readers[path.suffix.lower()](path)
    elif path.is_dir():
        records = _read_dataset(str(path), split)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in readers:
        raise GrpoKdError(f"FoQA file not found: {source}")
    else:
        records = _read_dataset(source, split)
    examples = [example_from_record(r, i, source) for i, r in enumerate(records)]
    if not examples:
        raise GrpoKdError(f"{source}: no FoQA examples")
    return examples[:limit] if limit is not None else examples


# ---------------------------------------------------------------------------------------------- prompting


def choose_shots(pool: Sequence[QAExample], k: int, seed: int = 0) -> list[QAExample]:
    """k examples whose first answer has at most three words; the shortest contexts of a seeded shuffle."""
    usable = [e for e in pool if e.answers and len(e.answers[0].split()) <= MAX_SHOT_ANSWER_WORDS]
    random.Random(seed).shuffle(usable)
    return sorted(usable[: max(4 * k, k)], key=lambda e: len(e.context))[:k]


def build_prompt(example: QAExample, shots: Sequence[QAExample]) -> str:
    blocks = [PROMPT_PREFIX]
    for shot in shots:
        blocks.append(PROMPT_TEMPLATE.format(context=shot.context, question=shot.question) + " " + shot.answers[0])
    blocks.append(PROMPT_TEMPLATE.format(context=example.context, question=example.question))
    return "\n\n".join(blocks)


def split_shots(
    examples: list[QAExample], k: int, train: list[QAExample] | None, seed: int = 0
) -> tuple[list[QAExample], list[QAExample]]:
    """(shots, evaluated): shots from `train` when given, else from `examples`, which then lose them."""
    if train is not None:
        return choose_shots(train, k, seed), examples
    shots = choose_shots(examples, k, seed)
    chosen = {id(s) for s in shots}
    return shots, [e for e in examples if id(e) not in chosen]


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_foqa(
    model,
    tokenizer,
    examples: Sequence[QAExample],
    shots: Sequence[QAExample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    language: str = "fo",
) -> dict:
    """Greedy few-shot answers to `examples`; mean EM / F1 and the first predictions for inspection."""
    if not examples:
        raise GrpoKdError("foqa: no examples left to evaluate after taking the few-shot examples")
    prompts = [build_prompt(e, shots) for e in examples]
    outputs = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size,
        max_prompt_tokens=max(8, max_positions(model) - max_new_tokens), stop_at_newline=True, description="foqa",
    )
    predictions = [o.text.strip() for o in outputs]
    scores = mean_qa_scores(predictions, [e.answers for e in examples], language)
    shown = [
        {"id": e.id, "question": e.question, "answers": list(e.answers), "prediction": p, **qa_scores(p, e.answers, language)}
        for e, p in list(zip(examples, predictions))[:EXAMPLES_IN_REPORT]
    ]
    return {**scores, "shots": len(shots), "examples": shown}
