"""The byte alignment of a teacher with another tokenizer (grpo_kd/xtok.py), on tokenizers only (no model):
every id's bytes for each family's tokenizer kind, the exact completion text, the last-byte rule worked out by
hand on a pair built piece by piece, invalid UTF-8, and each family's end of turn.
The rule against a teacher's own full-logit forward is tests/cache/test_xtok_cache.py."""

from __future__ import annotations

import numpy as np
import pytest

from grpo_kd.xtok import Aligner, AlignmentError, completion_text, end_of_turn_text, teacher_token_ends, token_bytes

FAROESE = ["Eg eri ein góður maður, ið ýtti ørindi á æ ð.", "Í fyrstuni var orðið, og orðið var hjá Guði.",
           "Tey sóu úti við sjógvin, har bátarnir ýttu frá landi."]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    """{family: tokenizer} trained on the built-in corpus (each family's kind: byte-level BPE, SentencePiece-style
    BPE with byte fallback and a dummy prefix, the same without it, a SentencePiece model)."""
    from grpo_kd.tiny import corpus_texts, train_tokenizer
    from grpo_kd.tiny_families import train_family_tokenizer

    texts = corpus_texts()
    out = {"llama": train_tokenizer(texts, 1024)}
    for arch in ("mistral", "gemma3", "gpt2"):
        out[arch] = train_family_tokenizer(arch, texts, 1024, tmp_path_factory.mktemp(arch))
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gpt2"])
def test_token_bytes_reproduce_the_text(family_tokenizers, arch):
    """The pieces of an encoded text join to its UTF-8 bytes (a SentencePiece dummy prefix adds one leading space),
    and the completion text is exactly what the completion adds to its prompt: `decode` of the completion alone
    drops a SentencePiece completion's leading space, which would glue the first word to the prompt's last."""
    tok = family_tokenizers[arch]
    table = token_bytes(tok)
    for text in FAROESE:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = b"".join(table.pieces[i] for i in ids)
        assert joined in (text.encode(), b" " + text.encode())
        prompt_ids = tok("Eg eri")["input_ids"] if text.startswith("Eg") else None
        if prompt_ids:
            full = tok(text)["input_ids"]
            assert full[:len(prompt_ids)] == prompt_ids
            assert completion_text(tok, full[len(prompt_ids):]) == text[len("Eg eri"):]  # " ein góður ..."
    assert table.pieces[tok.eos_token_id] == b"" and table.special[tok.eos_token_id]


def test_end_of_turn_of_each_family(family_tokenizers):
    ends = {arch: end_of_turn_text(tok, chat_template=True) for arch, tok in family_tokenizers.items()}
    assert ends == {"llama": "</s>", "mistral": "</s>", "gemma3": "<end_of_turn>", "gpt2": "\n<s>"}
    assert end_of_turn_text(family_tokenizers["gemma3"], chat_template=False) == "<eos>"


# ---------------------------------------------------------------------------------------------- by hand

BYTE_PIECES = [f"<0x{i:02X}>" for i in range(256)]
TEACHER_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _student():
    """SentencePiece-style BPE with byte fallback: single letters (no ø: it falls back to two byte pieces), merges
    ▁g, óð, ur, ▁m, að, ▁ý."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("▁", "g"), ("ó", "ð"), ("u", "r"), ("▁", "m"), ("a", "ð"), ("▁", "ý")]
    pieces = ["<unk>", "<s>", "</s>", *BYTE_PIECES, *"▁abdefghiklmnorstuvðáíóúýæ,.", *("".join(m) for m in merges)]
    model = models.BPE(vocab={p: i for i, p in enumerate(dict.fromkeys(pieces))}, merges=merges, unk_token="<unk>",
                       byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _teacher():
    """Byte-level BPE: the 256 byte symbols, merges " g" + the first byte of ó (a token that splits a character
    and crosses a student boundary), ð and ø whole, ur, " m", að, "ur,"; á í ú ý æ stay two byte tokens each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = pre_tokenizers.ByteLevel.alphabet()
    enc = _byte_level_text
    merges = [(enc(" "), enc("g")), (enc("ð")[0], enc("ð")[1]), (enc("ø")[0], enc("ø")[1]),
              (enc(" g"), enc("ó")[0]), (enc("u"), enc("r")), (enc(" "), enc("m")), (enc("a"), enc("ð")),
              (enc("ur"), enc(","))]
    specials = ["<|end|>", "<|user|>", "<|assistant|>", "<|eos|>"]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(specials + sorted(symbols) + ["".join(m) for m in merges]))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", additional_special_tokens=specials[:3])
    out.chat_template = TEACHER_CHAT
    return out


def _byte_level_text(text: str) -> str:
    """`text` in the byte-level BPE alphabet (each UTF-8 byte as its symbol)."""
    from grpo_kd.xtok import _byte_level_map

    symbol = {b: c for c, b in _byte_level_map().items()}
    return "".join(symbol[b] for b in text.encode("utf-8"))


def test_the_rule_by_hand():
    """"Eg" + " góður maður, ø á í ú ý æ" + eos. Student pieces (bytes), by index:
        0 ▁g  1 óð  2 ur  3 ▁m  4 að  5 ur  6 ,  7 ▁  8 <0xC3>  9 <0xB8>  10 ▁  11 á  12 ▁  13 í  14 ▁  15 ú
        16 ▁ý  17 ▁  18 æ  19 </s>
    Teacher tokens: " g"+C3 | B3 | ð | ur | " m" | að | "ur," | " " | ø | " " | C3 | A1 | " " | C3 | AD | " " | C3 |
    BA | " " | C3 | BD | " " | C3 | A6 | <|end|>. Each goes to the student token holding its last byte: " g"+C3
    ends inside óð (token 1, which it straddles into; token 0 gets nothing), "ur," inside "," (6; token 5 gets
    nothing), ø inside <0xB8> (9), the split á í ú ý æ inside the student's whole letters, <|end|> on the eos."""
    student, teacher = _student(), _teacher()
    prompt_ids = student("Eg")["input_ids"]
    full = student("Eg góður maður, ø á í ú ý æ")["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids
    completion = full[len(prompt_ids):] + [student.eos_token_id]
    assert student.convert_ids_to_tokens(completion)[7:10] == ["▁", "<0xC3>", "<0xB8>"]  # ø split in two bytes
    aligner = Aligner(student, teacher, chat_template=True)
    prompt = teacher.apply_chat_template([{"role": "user", "content": "Eg"}], tokenize=False,
                                         add_generation_prompt=True)
    row = aligner.align(prompt, completion, finished=True)
    assert row.owner.tolist() == [1, 1, 1, 2, 3, 4, 6, 7, 9, 10, 11, 11, 12, 13, 13, 14, 15, 15, 16, 16, 16, 17,
                                  18, 18, 19]
    assert row.straddled.tolist() == [0, 1, 0, 0, 0, 0, 1, 0, 0, 1] + [0] * 10
    assert row.student_bytes.tolist() == [2, 4, 2, 2, 3, 2, 1, 1, 1, 1, 1, 2, 1, 2, 1, 2, 3, 1, 2, 0]
    assert row.text_bytes == len(" góður maður, ø á í ú ý æ".encode())
    assert teacher.convert_ids_to_tokens([int(row.teacher_completion[-1])]) == ["<|end|>"]
    logprobs = -np.arange(1, len(row.owner) + 1, dtype=np.float32) / 8  # (C_T,) distinct, exact in binary
    values = row.student_values(logprobs)
    expected = np.zeros(len(completion))
    for j, s in enumerate(row.owner):
        expected[s] += logprobs[j]
    assert values.tolist() == expected.astype(np.float32).tolist()
    assert values[0] == 0 and values[5] == 0 and values[-1] == logprobs[-1]
    assert float(values.sum()) == pytest.approx(float(logprobs.sum()), abs=1e-6)
    # prompt and completion are tokenized together: the prompt's tokens are the teacher's own, up to the boundary
    assert teacher.decode(row.teacher_prompt) == prompt


def test_invalid_utf8_and_an_unfinished_completion():
    """A byte piece without its partner is shown to the teacher as U+FFFD (3 bytes), paid by the token that ends
    the invalid stretch; without an eos (finish "length") nothing is appended."""
    student, teacher = _student(), _teacher()
    ids = student.convert_tokens_to_ids(["▁g", "<0xC3>", "a", "<0xC3>"])
    assert completion_text(student, ids) == " g\ufffda\ufffd"
    row = Aligner(student, teacher, chat_template=False).align("Eg", ids, finished=False)
    assert row.student_bytes.tolist() == [2, 3, 1, 3] and row.text_bytes == 9
    assert set(row.owner.tolist()) <= {0, 1, 2, 3} and row.owner[-1] == 3
    assert b"".join(token_bytes(teacher).pieces[i] for i in row.teacher_completion).endswith("a\ufffd".encode())


def test_a_tokenizer_that_does_not_reproduce_the_text_is_refused():
    teacher = _teacher()
    ids = teacher("ab", add_special_tokens=False)["input_ids"]
    assert teacher_token_ends(token_bytes(teacher), ids, b"ab").tolist() == [1, 2]
    with pytest.raises(AlignmentError, match="does not match the text at byte 1"):
        teacher_token_ends(token_bytes(teacher), ids, b"aB")
