"""Prompts and plain text from the formats researchers keep them in: JSONL, Parquet, text, CoNLL-U, HF datasets.

Every source becomes a list of `Prompt` (id, text, optional privileged information) or a list of strings, read
as UTF-8 and never normalised, so Faroese letters (ð ø á í ó ú ý æ) come back exactly as written. Key design
choice: a format is read into a list of row dicts first (`_read_rows`), and prompts, privileged fields and texts
are picked from those rows in one place, so every format fails the same way on a missing field: one line that
names the field and the fields present.

For text and CoNLL-U, `prefix_words=N` turns each sentence into a prompt of its first N words with the rest as
the privileged continuation (what a privileged self-teacher sees, and what a completion can be checked against).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_kd.config import Config, DataConfig
from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "parquet", "text", "conllu", "hf")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".conllu": "conllu", ".txt": "text"}
_LINE_FORMATS = ("text", "conllu")  # sources whose rows are sentences, not records


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    privileged: str | None = None  # answer / demonstration / continuation, for the privileged self-teacher


# ---------------------------------------------------------------------------------------------- formats


def detect_format(source: str, format: str = "auto") -> str:
    """The format of `source`: as given, or from the suffix, a saved-dataset directory, or a hub-id shape."""
    if format not in FORMATS:
        raise GrpoKdError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    if format != "auto":
        return format
    path = Path(source).expanduser()
    if path.is_dir():
        return "hf"
    if path.is_file():
        return _SUFFIXES.get(path.suffix.lower(), "text")
    if _looks_like_hub_id(source):
        return "hf"
    raise GrpoKdError(f"data file not found: {source}")


def _looks_like_hub_id(source: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _SUFFIXES:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _require_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise GrpoKdError(f"data file not found: {source}")
    return path


def _read_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return [{"id": f"{path.stem}-{i}", "text": line.strip()} for i, line in enumerate(text.splitlines()) if line.strip()]


def _read_conllu(path: Path) -> list[dict[str, Any]]:
    """One row per sentence: its `# text = ` line, with its `# sent_id = ` as id when present."""
    rows: list[dict[str, Any]] = []
    sent_id = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# sent_id = "):
            sent_id = line[len("# sent_id = ") :].strip()
        elif line.startswith("# text = "):
            text = line[len("# text = ") :].strip()
            if text:
                rows.append({"id": sent_id or f"{path.stem}-{len(rows)}", "text": text})
        elif not line.strip():
            sent_id = None
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GrpoKdError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise GrpoKdError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise GrpoKdError(f"{path}: not a readable Parquet file: {exc}") from None


def _read_hf(source: str, split: str) -> list[dict[str, Any]]:
    """A dataset saved with `save_to_disk` (a directory), or a hub dataset where the hub is reachable."""
    import datasets  # 1.0-1.5 s (pandas included): only for hub or saved datasets

    path = Path(source).expanduser()
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise GrpoKdError(f"{source}: not a dataset saved with save_to_disk: {exc}") from None
    else:
        try:
            data = datasets.load_dataset(source, split=split)
        except Exception as exc:  # datasets raises many types for an unreachable hub or a missing name
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GrpoKdError(f"could not load dataset {source!r} (not a local path, hub unreachable or no such dataset): {first}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise GrpoKdError(f"{source}: no split {split!r}; splits present: {', '.join(data)}")
        data = data[split]
    return data.to_list()


def _read_rows(source: str, format: str, split: str) -> tuple[str, list[dict[str, Any]]]:
    fmt = detect_format(source, format)
    if fmt == "hf":
        return fmt, _read_hf(source, split)
    path = _require_file(source)
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_lines, "conllu": _read_conllu}
    return fmt, readers[fmt](path)


def _field(row: dict[str, Any], name: str, source: str) -> Any:
    if name not in row:
        raise GrpoKdError(f"{source}: no field {name!r}; fields present: {', '.join(map(str, row)) or 'none'}")
    return row[name]


# ---------------------------------------------------------------------------------------------- public API


def split_prefix(text: str, prefix_words: int) -> tuple[str, str] | None:
    """("first N words", "the rest"), or None when the sentence has no more than N words."""
    words = text.split(" ")
    if len(words) <= prefix_words:
        return None
    return " ".join(words[:prefix_words]), " ".join(words[prefix_words:])


def load_prompts(
    source: str,
    *,
    format: str = "auto",
    split: str = "train",
    prompt_field: str = "prompt",
    privileged_field: str | None = None,
    limit: int | None = None,
    prefix_words: int = 0,
) -> list[Prompt]:
    """Prompts from a file, a saved dataset or a hub dataset.

    Records (JSONL, Parquet, HF) give `prompt_field` and, if set, `privileged_field`, and `id` where present.
    Sentences (text, CoNLL-U) are whole prompts, or with `prefix_words > 0` their first words with the rest as
    privileged continuation (sentences too short for that are skipped).
    """
    fmt, rows = _read_rows(source, format, split)
    prompts: list[Prompt] = []
    for index, row in enumerate(rows):
        if limit is not None and len(prompts) >= limit:
            break
        prompt = _row_prompt(row, index, fmt, source, prompt_field, privileged_field, prefix_words)
        if prompt is not None:
            prompts.append(prompt)
    if not prompts:
        raise GrpoKdError(f"{source}: no prompts found")
    return prompts


def _row_prompt(row, index, fmt, source, prompt_field, privileged_field, prefix_words) -> Prompt | None:
    if fmt in _LINE_FORMATS:
        text, privileged = row["text"], None
        if prefix_words > 0:
            parts = split_prefix(text, prefix_words)
            if parts is None:
                return None
            text, privileged = parts
        return Prompt(id=row["id"], text=text, privileged=privileged)
    text = _field(row, prompt_field, source)
    privileged = _field(row, privileged_field, source) if privileged_field else None
    if not isinstance(text, str):
        raise GrpoKdError(f"{source}: field {prompt_field!r} of row {index} is {type(text).__name__}, not text")
    row_id = row.get("id")
    return Prompt(
        id=str(row_id) if row_id is not None else f"{Path(source).stem}-{index}",
        text=text,
        privileged=None if privileged is None else str(privileged),
    )


def load_texts(source: str, *, format: str = "auto", field: str = "text", limit: int | None = None) -> list[str]:
    """Plain strings for pre-training batches and perplexity: lines, sentences, or `field` of each record."""
    fmt, rows = _read_rows(source, format, "train")
    texts = [row["text"] if fmt in _LINE_FORMATS else _field(row, field, source) for row in rows]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise GrpoKdError(f"{source}: no text found")
    return texts[:limit] if limit is not None else texts


def prompts_from_config(cfg: DataConfig) -> list[Prompt]:
    """The training prompts a `DataConfig` names."""
    if not cfg.prompts:
        raise GrpoKdError("data.prompts is not set: give a JSONL, Parquet, text or CoNLL-U file, or a dataset")
    return load_prompts(
        cfg.prompts,
        format=cfg.format,
        split=cfg.split,
        prompt_field=cfg.prompt_field,
        privileged_field=cfg.privileged_field,
        limit=cfg.max_prompts,
        prefix_words=cfg.prefix_words,
    )


def split_heldout(prompts: list[Prompt], fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, heldout): a seeded random `fraction` held out (at least one when fraction > 0), order kept."""
    if not 0.0 <= fraction < 1.0:
        raise GrpoKdError(f"held-out fraction must be in [0, 1), got {fraction}")
    count = 0 if fraction == 0 or len(prompts) < 2 else max(1, math.floor(fraction * len(prompts)))
    held = set(random.Random(seed).sample(range(len(prompts)), count))
    train = [p for i, p in enumerate(prompts) if i not in held]
    heldout = [p for i, p in enumerate(prompts) if i in held]
    return train, heldout


def render_prompt(
    tokenizer, prompt: Prompt, *, chat_template: bool = False, privileged_template: str | None = None
) -> str:
    """The text the model is conditioned on.

    With `privileged_template` (e.g. "{privileged}\\n\\n{prompt}") the privileged information is placed in the
    prompt, as the privileged self-teacher sees it. With `chat_template` the result is one user turn rendered
    through the tokenizer's chat template, ending with the assistant's generation prompt.
    """
    content = prompt.text
    if privileged_template is not None:
        if prompt.privileged is None:
            raise GrpoKdError(f"prompt {prompt.id!r} has no privileged information for the privileged template")
        try:
            content = privileged_template.format(prompt=prompt.text, privileged=prompt.privileged)
        except (KeyError, IndexError, ValueError) as exc:
            raise GrpoKdError(
                f"privileged template {privileged_template!r} is not valid; use {{prompt}} and {{privileged}}: {exc}"
            ) from None
    if not chat_template:
        return content
    if not getattr(tokenizer, "chat_template", None):
        raise GrpoKdError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set data.chat_template=false")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str, *, chat_template: bool, max_tokens: int | None = None) -> list[int]:
    """A rendered prompt -> ids: special tokens added unless a chat template already placed them; truncated
    from the left to `max_tokens`. The rollout and the teacher pass both encode with this function."""
    ids = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]
    return ids[-max_tokens:] if max_tokens else ids


def prompt_token_ids(
    tokenizer, prompt: Prompt, *, chat_template: bool, privileged_template: str | None = None,
    max_tokens: int | None = None,
) -> list[int]:
    """`render_prompt` then `encode_prompt`: the ids a model with `tokenizer` is conditioned on."""
    text = render_prompt(tokenizer, prompt, chat_template=chat_template, privileged_template=privileged_template)
    return encode_prompt(tokenizer, text, chat_template=chat_template, max_tokens=max_tokens)


def teacher_chat_template(cfg: Config) -> bool:
    """Whether the teacher's prompts go through its tokenizer's chat template: `teacher.chat_template`, or
    `data.chat_template` when that is unset."""
    return cfg.data.chat_template if cfg.teacher.chat_template is None else cfg.teacher.chat_template


def teacher_has_own_prompt(cfg: Config) -> bool:
    """Whether the teacher must be given a prompt of its own rather than the student's prompt ids: a model
    teacher that renders a chat template (its own, even with the student's vocabulary), a teacher format other than
    the student's, or the privileged self-teacher. (A teacher with another vocabulary always has its own.)"""
    chat = teacher_chat_template(cfg)
    return (cfg.teacher.kind == "self_privileged" or chat != cfg.data.chat_template
            or (chat and cfg.teacher.kind == "model"))
