"""Prompt and text loading: every format keeps Faroese letters, prefixes become privileged continuations, errors are one line."""

import json

import pytest

from grpo_kd.config import DataConfig
from grpo_kd.data import Prompt, load_prompts, load_texts, prompts_from_config, render_prompt, split_heldout
from grpo_kd.errors import GrpoKdError

ROWS = [
    {"id": "a", "prompt": "Hvat eitur høvuðsstaðurin í Føroyum?", "answer": "Tórshavn"},
    {"id": "b", "prompt": "ÐØÁÍÓÚÝÆ ella ðøáíóúýæ?", "answer": "Bæði"},
    {"id": "c", "prompt": "Hvør málar eina rós á Suðuroy?", "answer": "Ýmir og Ása"},
]
SENTENCES = [
    "Fiskimaðurin sær ein bát við sjóvarmálan.",
    "Í dag er mjørki á Suðuroy.",
    "ØSSUR ÁT ÝSU Í GJÁR ÚTI Á ÆÐUSKERI.",
]
CONLLU = """# sent_id = s1
# text = Fiskimaðurin sær ein bát við sjóvarmálan.
# text[eng] = The fisherman sees a boat by the shore.
1\tFiskimaðurin\tfiskimaður\tNOUN\t_\t_\t2\tnsubj\t_\t_

# sent_id = s2
# text = Í dag er mjørki á Suðuroy.
1\tÍ\tí\tADP\t_\t_\t2\tcase\t_\t_

# text = ØSSUR ÁT ÝSU Í GJÁR ÚTI Á ÆÐUSKERI.
1\tØSSUR\tøssur\tPROPN\t_\t_\t2\tnsubj\t_\t_
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same Faroese prompts in every format: {format: path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    jsonl = root / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    parquet = root / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    hf = root / "hf"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(hf))
    hf_dict = root / "hf_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(hf_dict))
    text = root / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n\n", encoding="utf-8")
    conllu = root / "sentences.conllu"
    conllu.write_text(CONLLU, encoding="utf-8")
    return {"jsonl": jsonl, "parquet": parquet, "hf": hf, "hf_dict": hf_dict, "text": text, "conllu": conllu}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf", "hf_dict"])
def test_records_roundtrip_faroese(sources, kind):
    prompts = load_prompts(str(sources[kind]), privileged_field="answer")
    assert prompts == [Prompt(id=r["id"], text=r["prompt"], privileged=r["answer"]) for r in ROWS]
    assert load_texts(str(sources[kind]), field="prompt") == [r["prompt"] for r in ROWS]


@pytest.mark.parametrize("kind", ["text", "conllu"])
def test_sentences_roundtrip_faroese(sources, kind):
    prompts = load_prompts(str(sources[kind]))
    assert [p.text for p in prompts] == SENTENCES and all(p.privileged is None for p in prompts)
    assert load_texts(str(sources[kind])) == SENTENCES
    assert len({p.id for p in prompts}) == 3


def test_conllu_ids_and_prefix_words(sources):
    prompts = load_prompts(str(sources["conllu"]), prefix_words=3)
    assert [p.id for p in prompts][:2] == ["s1", "s2"]
    assert prompts[0] == Prompt(id="s1", text="Fiskimaðurin sær ein", privileged="bát við sjóvarmálan.")
    assert all(f"{p.text} {p.privileged}" == s for p, s in zip(prompts, SENTENCES))
    assert len(load_prompts(str(sources["text"]), prefix_words=6)) == 1  # the two 6-word sentences are skipped


def test_limit_and_explicit_format(sources, tmp_path):
    assert len(load_prompts(str(sources["jsonl"]), limit=2)) == 2
    odd = tmp_path / "prompts.data"
    odd.write_bytes(sources["jsonl"].read_bytes())
    assert load_prompts(str(odd), format="jsonl")[1].text == ROWS[1]["prompt"]
    assert load_prompts(str(odd))[0].text.startswith("{")  # unknown suffix: read as plain text


def test_missing_field_names_the_fields(sources):
    for kind in ("jsonl", "parquet", "hf"):
        with pytest.raises(GrpoKdError, match=r"no field 'question'; fields present: id, prompt, answer") as exc:
            load_prompts(str(sources[kind]), prompt_field="question")
        assert "\n" not in str(exc.value)
        with pytest.raises(GrpoKdError, match="'solution'"):
            load_prompts(str(sources[kind]), privileged_field="solution")
    with pytest.raises(GrpoKdError, match="no split 'test'; splits present: train"):
        load_prompts(str(sources["hf_dict"]), split="test")


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(GrpoKdError, match="data file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(GrpoKdError, match="data file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"), format="jsonl")
    with pytest.raises(GrpoKdError, match="unknown data format"):
        load_prompts(str(tmp_path), format="csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(GrpoKdError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(str(bad))
    with pytest.raises(GrpoKdError) as exc:  # a hub name while the hub is offline: one line, no traceback
        load_prompts("someone/no-such-dataset")
    assert "someone/no-such-dataset" in str(exc.value) and "\n" not in str(exc.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(GrpoKdError, match="no prompts"):
        load_prompts(str(empty))


def test_prompts_from_config(sources):
    cfg = DataConfig(prompts=str(sources["conllu"]), prefix_words=2, max_prompts=2)
    prompts = prompts_from_config(cfg)
    assert [p.text for p in prompts] == ["Fiskimaðurin sær", "Í dag"]
    with pytest.raises(GrpoKdError, match="data.prompts is not set"):
        prompts_from_config(DataConfig())


def test_split_heldout_is_deterministic():
    prompts = [Prompt(id=str(i), text=f"setningur {i}") for i in range(50)]
    train, heldout = split_heldout(prompts, 0.1, seed=3)
    assert len(heldout) == 5 and len(train) == 45
    assert sorted(p.id for p in train + heldout) == sorted(p.id for p in prompts)
    assert (train, heldout) == split_heldout(prompts, 0.1, seed=3)
    assert heldout != split_heldout(prompts, 0.1, seed=4)[1]
    assert split_heldout(prompts, 0.0, seed=3) == (prompts, [])  # data.heldout_fraction's range: the config's rules


def test_render_prompt(tiny_models_quick):
    from grpo_kd.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models_quick.tokenizer))
    prompt = Prompt(id="a", text="Hvat eitur høvuðsstaðurin?", privileged="Tórshavn")
    assert render_prompt(tokenizer, prompt) == prompt.text
    privileged = render_prompt(tokenizer, prompt, privileged_template="{privileged}\n\n{prompt}")
    assert privileged == "Tórshavn\n\nHvat eitur høvuðsstaðurin?"
    chat = render_prompt(tokenizer, prompt, chat_template=True, privileged_template="Svar: {privileged}. {prompt}")
    assert chat == "<|user|>\nSvar: Tórshavn. Hvat eitur høvuðsstaðurin?</s>\n<|assistant|>\n"
    with pytest.raises(GrpoKdError, match="no privileged"):
        render_prompt(tokenizer, Prompt(id="b", text="x"), privileged_template="{privileged} {prompt}")
    with pytest.raises(GrpoKdError, match="not valid"):
        render_prompt(tokenizer, prompt, privileged_template="{answer} {prompt}")
    tokenizer.chat_template = None
    with pytest.raises(GrpoKdError, match="no chat template"):
        render_prompt(tokenizer, prompt, chat_template=True)


def test_faroese_treebanks(faroese_dir, tiny_models_quick):
    from grpo_kd.models import load_tokenizer

    dev = load_prompts(str(faroese_dir / "farpahc-dev.conllu"))
    assert len(dev) == 300
    oft = load_texts(str(faroese_dir / "oft-part1.conllu"))
    assert len(oft) == 800 and oft[0] == "Føroyar eru ikki limur í ES, hóast Danmark er."
    tokenizer = load_tokenizer(str(tiny_models_quick.tokenizer))  # trained on the built-in corpus, not on these
    for text in oft + [p.text for p in dev]:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
