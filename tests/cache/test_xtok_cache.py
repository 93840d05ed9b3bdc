"""A teacher with another tokenizer through `grpo-kd cache-teacher`: a Mistral-family student and a Gemma-3-family
teacher, on completions written by hand with ð ø á í ó ú ý æ, characters split into byte pieces on either side,
an end of sequence and an unfinished row. The cache's per-student-token values must sum to the teacher's
log-likelihood of each completion (its own tokens of its chat prompt + the completion text + <end_of_turn>,
scored with full logits), and each value must be the sum of the teacher tokens whose last byte the student token
holds, with the teacher's byte ends read from its tokenizer's offsets here (not from grpo_kd/xtok.py's walk).
Then `cache verify` passes and catches a broken alignment record, and `cache stats` reports the straddled share."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from grpo_kd.cache.rollouts import RolloutRecord, RolloutStore, write_rollout_shard
from grpo_kd.cache.teacher import ScoredRows, TeacherShardSink, open_teacher_shards
from grpo_kd.cli.app import main
from grpo_kd.models import load_tokenizer
from grpo_kd.paths import RunPaths
from grpo_kd.xtok import completion_text, token_bytes

pytestmark = pytest.mark.slow

# (prompt, completion text, finished, characters the student writes as byte pieces)
ROWS = [("Eg eri", " ein góður maður, ið ýtti ørindi.", True, "ð"),
        ("Í fyrstuni", " var orðið hjá Guði á sjónum, og æ.", True, "øæ"),
        ("Tey sóu", " úti við sjógvin í ŵ €", False, "í"),  # ŵ and € are byte pieces for both tokenizers
        ("Hann", "", True, "")]  # only an end of sequence
END_OF_TURN = "<end_of_turn>"
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


def _completion_ids(tok, prompt: str, text: str, as_bytes: str) -> list[int]:
    """The student's ids of `text` after `prompt`, with the characters of `as_bytes` as byte pieces."""
    full, prompt_ids = tok(prompt + text)["input_ids"], tok(prompt)["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids
    out = []
    for piece in tok.convert_ids_to_tokens(full[len(prompt_ids):]):
        parts, chars = [], ""
        for ch in piece:
            if ch in as_bytes:
                parts += [chars] if chars else []
                parts += [f"<0x{b:02X}>" for b in ch.encode()]
                chars = ""
            else:
                chars += ch
        parts += [chars] if chars else []
        out += tok.convert_tokens_to_ids(parts)
    assert completion_text(tok, out) == text and tok.unk_token_id not in out
    return out


def _write_rollouts(run_dir, tok) -> None:
    records = []
    for g, (prompt, text, finished, as_bytes) in enumerate(ROWS):
        ids = _completion_ids(tok, prompt, text, as_bytes) + ([tok.eos_token_id] if finished else [])
        records.append(RolloutRecord(
            prompt_id=f"p{g}", group_id=g, sample_index=0, prompt_ids=tok(prompt)["input_ids"], completion_ids=ids,
            old_logprobs=np.full(len(ids), -1.0, np.float32), finish_reason="stop" if finished else "length",
            prompt_text=prompt, completion_text=completion_text(tok, ids)))
    write_rollout_shard(RunPaths.of(run_dir).rollouts(1), 0, records, meta={"sampling": {"group_size": 1}})


def _teacher_reference(tok, model, prompt: str, text: str, finished: bool) -> tuple[np.ndarray, np.ndarray]:
    """(byte ends relative to the completion, full-logit log-probs) of the teacher tokens that end after the
    prompt, from one forward on its own tokens of chat prompt + completion + end of turn."""
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    whole = rendered + text + (END_OF_TURN if finished else "")
    enc = tok(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    char_bytes = np.concatenate([[0], np.cumsum([len(c.encode()) for c in whole])])  # byte where each char starts
    ends, in_char = [], 0
    for j, (piece, (start, end)) in enumerate(zip(tok.convert_ids_to_tokens(ids), offsets)):
        byte_piece = BYTE_PIECE.match(piece) is not None
        in_char = in_char + 1 if byte_piece and j and offsets[j - 1][0] == start and ends else (1 if byte_piece else 0)
        ends.append(char_bytes[start] + in_char if byte_piece else char_bytes[end])
    ends = np.array(ends) - len(rendered.encode())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1, :len(tok)].double()  # (L - 1, V) position j-1 -> token j
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    scored = np.nonzero(ends > 0)[0]
    return ends[scored], logprobs[scored - 1]


def test_aligned_values_against_the_teachers_own_forward(tmp_path, tiny_family, capsys):
    student_dir, teacher_dir = tiny_family("mistral").student, tiny_family("gemma3").teacher
    student_tok, teacher_tok = load_tokenizer(str(student_dir)), load_tokenizer(str(teacher_dir))
    run_dir = tmp_path / "run"
    _write_rollouts(run_dir, student_tok)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "run", "output_dir": str(tmp_path), "model": {"path": str(student_dir)},
                                      "teacher": {"path": str(teacher_dir), "chat_template": True,
                                                  "reference": False}}))
    assert main(["cache-teacher", "--config", str(config), "--iteration", "1"]) == 0
    (shard,) = open_teacher_shards(RunPaths.of(run_dir).teacher(1))
    assert shard.manifest["alignment"]["rule"] == "last-byte" and shard.manifest["alignment"]["end_of_turn"] == END_OF_TURN
    names = ["target_logprobs", "xtok_bytes", "xtok_teacher_tokens", "xtok_straddled"]
    rows = np.arange(len(ROWS))
    cached = shard.reader.read(rows, names)
    seq = shard.reader.row_values("seq_logprob")
    store = RolloutStore.open(RunPaths.of(run_dir).rollouts(1))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    table = token_bytes(student_tok)
    for r, (prompt, text, finished, _) in enumerate(ROWS):
        ids = store[r].completion_ids
        stops = np.cumsum([len(table.pieces[i]) for i in ids])  # (C,) byte where each student token ends
        if finished:
            stops[-1] = len(text.encode()) + len(END_OF_TURN)  # the eos covers the end of turn
        teacher_ends, logprobs = _teacher_reference(teacher_tok, teacher, prompt, text, finished)
        owner = np.searchsorted(stops, teacher_ends, side="left")  # the student token holding each last byte
        expected = np.bincount(owner, weights=logprobs, minlength=len(ids))
        values = cached["target_logprobs"][r]
        assert float(values.astype(np.float64).sum()) == pytest.approx(logprobs.sum(), abs=1e-4)  # float32 sums
        assert seq[r] == pytest.approx(logprobs.sum(), abs=1e-4)
        np.testing.assert_allclose(values, expected, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(cached["xtok_teacher_tokens"][r], np.bincount(owner, minlength=len(ids)))
        if finished:
            assert values[-1] == pytest.approx(logprobs[-1], abs=2e-5)  # eos: the teacher's <end_of_turn>
    assert any(cached["xtok_straddled"][r].any() for r in rows)  # student byte pieces inside whole teacher letters
    assert any(((cached["xtok_teacher_tokens"][r] == 0) & (cached["xtok_bytes"][r] > 0)).any() for r in rows)
    capsys.readouterr()

    assert main(["cache", "stats", str(run_dir)]) == 0
    assert "straddled student boundaries" in capsys.readouterr().out
    stats = json.loads((RunPaths.of(run_dir).reports / "cache_stats_iter_0001.json").read_text())
    straddled = np.concatenate([cached["xtok_straddled"][r][cached["xtok_bytes"][r] > 0] for r in rows])
    assert stats["alignment"]["straddled_boundary_share"] == pytest.approx(straddled.mean())
    assert main(["cache", "verify", str(run_dir)]) == 0

    _rewrite_with(shard, "xtok_teacher_tokens", lambda v: v + (np.arange(len(v)) == 0))  # one teacher token more
    capsys.readouterr()
    assert main(["cache", "verify", str(run_dir)]) == 1
    assert "do not hold every teacher token" in capsys.readouterr().out


def _rewrite_with(shard, name: str, change) -> None:
    """Write the shard again (a valid file and manifest) with token field `name` changed by `change`."""
    reader, spec = shard.reader, shard.spec
    rows = reader.rows()
    fields = list(spec.token_fields())
    views = reader.read(rows, fields)
    token = {f: np.concatenate(views[f]) for f in fields}
    token[name] = change(token[name]).astype(token[name].dtype)
    values = {f: reader.row_values(f)[rows] for f in spec.row_fields()}
    scored = ScoredRows(row=rows, group_id=values["group_id"], num_tokens=values["num_tokens"],
                        seq_logprob=values["seq_logprob"], token=token,
                        extra={"xtok_num_tokens": values["xtok_num_tokens"], "xtok_num_bytes": values["xtok_num_bytes"]})
    keep = {k: v for k, v in shard.manifest.items()
            if k not in ("kind", "format", "file", "sha256", "bytes", "rows", "tokens", "spec", "version", "shard")}
    with TeacherShardSink(shard.path.parent, shard.shard, spec, total_rows=len(rows),
                          total_tokens=int(values["num_tokens"].sum()), manifest=keep) as sink:
        sink.add(scored)
