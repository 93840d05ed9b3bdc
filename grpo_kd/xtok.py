"""Byte alignment of a teacher with another tokenizer: per student completion token, the teacher's log-prob of the
bytes that token covers.

    table = token_bytes(tokenizer)                       # every id's UTF-8 bytes (special tokens: none)
    text = completion_text(tokenizer, completion_ids)    # the exact continuation text (what the rollout stores)
    aligner = Aligner(student_tokenizer, teacher_tokenizer, chat_template=True)
    row = aligner.align(prompt_text_in_teacher_format, completion_ids, finished=True)
    values = row.student_values(teacher_logprobs)        # (C,) float32: sums to sum(teacher_logprobs)

Key design choice: everything is measured in UTF-8 bytes, never in characters. A student token covers exactly
its own bytes (`token_bytes`: byte-level BPE pieces through the GPT-2 byte map, SentencePiece pieces with "▁" as a
space and `<0xNN>` as one byte), so a token may cover half of "ð" (2 bytes); special tokens cover none. The
teacher's prompt (in its own format) and the completion text are tokenized together, once, so the teacher's
own tokenization of the boundary is what it scores; the byte where each teacher token ends comes from walking
its pieces along that text (`teacher_token_ends`), which fails in one line when its pieces do not reproduce the
text byte for byte (a normalising tokenizer, or an <unk>), rather than aligning wrongly.

The rule ("last-byte"): a teacher token belongs to the student token that holds its last byte. So each student
token's value is the log-prob of the teacher tokens that end inside it, a log-probability of a prefix extension
(the teacher's tokens up to that student token's end, given those before), and the values of a completion sum
to the teacher's log-likelihood of it exactly. A teacher token that straddles a student boundary is paid in full
by the student token where it ends (the one before gets 0 for it); one that straddles the prompt / completion
boundary is paid by the first completion token. A finished completion's end-of-sequence token covers the
teacher's own end-of-turn text (the chat template's text after an assistant message up to its first special
token, e.g. Gemma's `<end_of_turn>`; without a chat template the eos token), appended to the text before it is
tokenized, so the student's eos gets the teacher's log-prob of ending there. Invalid UTF-8 in a completion (a
sampled byte token without its partner) is shown to the teacher as U+FFFD, paid by the token holding the
invalid sequence's last byte.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass

import numpy as np

from grpo_kd.cache.spec import ALIGNMENT_RULES
from grpo_kd.errors import GrpoKdError

RULE = ALIGNMENT_RULES[0]  # "last-byte": the straddling rule, recorded in the cache's spec
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_MARKER = "GRPOKDMARKER"  # an assistant message, to find what the chat template puts after one


class AlignmentError(GrpoKdError):
    """A teacher tokenization that does not reproduce the text it was given, byte for byte."""


# ---------------------------------------------------------------------------------------------- bytes of tokens


@dataclass(frozen=True)
class TokenBytes:
    """The UTF-8 bytes of every id of a tokenizer (`len(tokenizer)` entries)."""

    pieces: list[bytes]  # text bytes of each id; b"" for special tokens
    special: np.ndarray  # (V,) bool: a special token (no text of its own in a completion)
    content: list[bytes]  # what a special token is written as in a rendered prompt (b"" for the others)


def _byte_level_map() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, every other byte b is written
    as chr(256 + n), n counting those bytes in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False  # a SentencePiece model (GPT-SW3's slow tokenizer)
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d and d.get("type") == "ByteLevel" for d in decoders)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> TokenBytes:
    """Every id's bytes (computed once per tokenizer object): see the module doc."""
    cached = _TABLES.get(tokenizer)
    if cached is not None:
        return cached
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {int(i): tok for i, tok in tokenizer.added_tokens_decoder.items()}
    special = np.zeros(n, bool)
    special[[i for i in tokenizer.all_special_ids if i < n]] = True
    for i, tok in added.items():
        if i < n and tok.special:
            special[i] = True
    byte_map = _byte_level_map() if _is_byte_level(tokenizer) else None
    out, content = [], []
    for i, piece in enumerate(pieces):
        if i in added:  # an added token is matched in the text as written
            text = added[i].content.encode("utf-8")
            out.append(b"" if special[i] else text)
            content.append(text if special[i] else b"")
            continue
        content.append(b"")
        if special[i] or piece is None:
            out.append(b"")
        elif byte_map is not None:
            out.append(bytes(byte_map[c] for c in piece) if all(c in byte_map for c in piece) else piece.encode())
        else:
            match = _BYTE_PIECE.match(piece)
            out.append(bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode("utf-8"))
    table = TokenBytes(out, special, content)
    _TABLES[tokenizer] = table
    return table


def completion_spans(table: TokenBytes, ids) -> tuple[bytes, np.ndarray]:
    """(raw bytes of the completion, (C + 1,) int64 byte offsets: token t covers raw[offsets[t]:offsets[t+1]])."""
    parts = [table.pieces[int(i)] if 0 <= int(i) < len(table.pieces) else b"" for i in ids]
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    return b"".join(parts), offsets


def _invalid_runs(raw: bytes) -> list[tuple[int, int]]:
    """The stretches of `raw` that are not UTF-8, as `bytes.decode(errors="replace")` replaces each by U+FFFD."""
    runs, pos = [], 0
    while True:
        try:
            raw[pos:].decode("utf-8")
            return runs
        except UnicodeDecodeError as exc:
            runs.append((pos + exc.start, pos + exc.end))
            pos += exc.end


def to_text(raw: bytes, offsets: np.ndarray) -> tuple[str, np.ndarray]:
    """Raw completion bytes -> (text with U+FFFD for each invalid stretch, (C + 1,) offsets into its UTF-8).

    Valid bytes keep their place (shifted by the replacements before them); an offset inside an invalid stretch
    moves to the stretch's start, so its 3-byte U+FFFD belongs to the token holding the stretch's last byte."""
    text = raw.decode("utf-8", errors="replace")
    runs = _invalid_runs(raw)
    if not runs:
        return text, offsets.copy()
    shift = np.zeros_like(offsets)  # (C + 1,)
    for start, end in runs:
        shift += np.where(offsets >= end, 3 - (end - start), 0)  # U+FFFD is 3 bytes in place of end - start
        inside = (offsets > start) & (offsets < end)
        shift[inside] += start - offsets[inside]
    return text, offsets + shift


def completion_text(tokenizer, ids) -> str:
    """The text a completion adds to its prompt, exactly: its tokens' bytes without special tokens, invalid
    UTF-8 as U+FFFD. (`tokenizer.decode` of the completion alone drops a SentencePiece completion's leading space.)"""
    raw, offsets = completion_spans(token_bytes(tokenizer), ids)
    return to_text(raw, offsets)[0]


# ---------------------------------------------------------------------------------------------- the teacher side


def teacher_token_ends(table: TokenBytes, ids, text: bytes) -> np.ndarray:
    """(N,) int64: the byte of `text` where each teacher token ends, walking its pieces along the text.

    A special token covers its written form where the text has it there, and nothing where the tokenizer added
    it (a BOS); a piece that starts with a space the text lacks at that point had it added by the pre-tokenizer
    (SentencePiece's dummy prefix). Anything else is an `AlignmentError` naming the place."""
    pos, ends = 0, np.zeros(len(ids), np.int64)
    for j, i in enumerate(int(t) for t in ids):
        if table.special[i]:
            written = table.content[i]
            if written and text.startswith(written, pos):
                pos += len(written)
        else:
            piece = table.pieces[i]
            if text.startswith(piece, pos):
                pos += len(piece)
            elif piece[:1] == b" " and text.startswith(piece[1:], pos):
                pos += len(piece) - 1
            else:
                raise AlignmentError(f"the teacher's token {j} ({piece!r}) does not match the text at byte {pos} "
                                     f"({text[pos:pos + 12]!r}): its tokenizer does not reproduce the text byte "
                                     "for byte, so its log-probs cannot be aligned with the student's tokens")
        ends[j] = pos
    if pos != len(text):
        raise AlignmentError(f"the teacher's tokens cover {pos} of the text's {len(text)} bytes "
                             f"(unmatched: {text[pos:pos + 12]!r}); cannot align its log-probs")
    return ends


def end_of_turn_text(tokenizer, chat_template: bool) -> str:
    """What the teacher writes after a finished answer: with a chat template, the template's text after an
    assistant message up to and including its first special token; else the eos token."""
    eos = tokenizer.eos_token or ""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARKER}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that refuses this shape: fall back to the eos token
            rendered = ""
        tail = rendered.partition(_MARKER)[2] if _MARKER in rendered else ""
        specials = [t for t in tokenizer.all_special_tokens if t and t in tail]
        if specials:
            cut = min(tail.index(t) + len(t) for t in specials)
            return tail[:cut]
    if not eos:
        raise GrpoKdError(f"the teacher tokenizer {tokenizer.name_or_path!r} has no eos token to end a completion "
                          "with")
    return eos


# ---------------------------------------------------------------------------------------------- one row


@dataclass(frozen=True)
class RowAlignment:
    """One completion in the teacher's tokens and where each of them goes (C student tokens, C_T teacher tokens
    scored: those ending after the prompt)."""

    teacher_prompt: np.ndarray  # (P_T,) int64 teacher ids of the prompt (tokens ending at or before its end)
    teacher_completion: np.ndarray  # (C_T,) int64 the teacher ids scored, completion and end of turn
    owner: np.ndarray  # (C_T,) int64 the student token each teacher token's log-prob goes to
    student_bytes: np.ndarray  # (C,) int32 completion-text bytes each student token covers (eos: 0)
    straddled: np.ndarray  # (C,) int8 1: a teacher token crosses the byte where this student token starts
    text_bytes: int  # UTF-8 bytes of the completion text

    def student_values(self, teacher_logprobs: np.ndarray) -> np.ndarray:
        """(C_T,) teacher log-probs -> (C,) float32 per student token (0 where no teacher token ends)."""
        sums = np.bincount(self.owner, weights=np.asarray(teacher_logprobs, np.float64),
                           minlength=len(self.student_bytes))
        return sums.astype(np.float32)

    def teacher_counts(self) -> np.ndarray:
        """(C,) int32 teacher tokens paid by each student token."""
        return np.bincount(self.owner, minlength=len(self.student_bytes)).astype(np.int32)


class Aligner:
    """Both tokenizers' byte tables and the teacher's end of turn; `align` builds one row's `RowAlignment`."""

    def __init__(self, student_tokenizer, teacher_tokenizer, *, chat_template: bool):
        self.student, self.teacher = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
        self.add_special_tokens = not chat_template  # as `grpo_kd.data.encode_prompt` encodes a prompt
        self.end_text = end_of_turn_text(teacher_tokenizer, chat_template)

    def describe(self) -> dict:
        """The mapping, for the cache manifest."""
        return {"rule": RULE, "unit": "utf-8 bytes", "end_of_turn": self.end_text,
                "invalid_utf8": "shown to the teacher as U+FFFD"}

    def align(self, prompt_text: str, completion_ids, finished: bool) -> RowAlignment:
        """`prompt_text`: the prompt as the teacher reads it (rendered in its own format); `finished`: the
        completion ends with the student's eos (finish_reason "stop"), which then covers the end of turn."""
        raw, offsets = completion_spans(self.student, completion_ids)
        text, spans = to_text(raw, offsets)  # (C + 1,) offsets into the completion text's bytes
        C = len(offsets) - 1
        prompt, body = prompt_text.encode("utf-8"), text.encode("utf-8")
        end = self.end_text.encode("utf-8") if finished and C else b""
        whole = prompt + body + end
        ids = self.teacher_tokenizer(whole.decode("utf-8"), add_special_tokens=self.add_special_tokens)["input_ids"]
        ends = teacher_token_ends(self.teacher, ids, whole) - len(prompt)  # (N,) relative to the completion
        while len(ids) > 1 and ends[-1] == ends[-2] and self.teacher.special[ids[-1]]:  # an eos the tokenizer adds
            ids, ends = ids[:-1], ends[:-1]
        starts, stops = spans[:-1].copy(), spans[1:].copy()  # (C,) each
        if end:  # the eos covers the end of turn
            starts[-1], stops[-1] = len(body), len(body) + len(end)
        scored = ends > 0
        if scored.any() and not (~scored).any():
            raise AlignmentError("the teacher's prompt has no token of its own to condition the completion on")
        has_bytes = np.nonzero(stops > starts)[0]  # (K,) the student tokens with bytes, in order
        owner = has_bytes[np.searchsorted(stops[has_bytes], ends[scored], side="left")]  # (C_T,)
        boundaries = np.concatenate([[0], ends + len(prompt)])  # every byte where a teacher token ends
        straddled = np.zeros(C, np.int8)
        straddled[has_bytes] = ~np.isin(starts[has_bytes] + len(prompt), boundaries)
        student_bytes = (spans[1:] - spans[:-1]).astype(np.int32)
        return RowAlignment(teacher_prompt=np.asarray(ids, np.int64)[~scored],
                            teacher_completion=np.asarray(ids, np.int64)[scored], owner=owner.astype(np.int64),
                            student_bytes=student_bytes, straddled=straddled, text_bytes=len(body))
