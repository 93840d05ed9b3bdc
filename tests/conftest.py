"""Root fixtures shared by every test package. Models are built once per session, in a temporary directory.

Fixtures (keep the names: tests all over the project use them):

- `tiny_models` -> `grpo_kd.tiny.TinyModels(teacher, student, tokenizer)`: directories built from the built-in
  corpus with a short pre-training (teacher 40 steps, student 10), so the teacher is clearly the better model.
  Both share one 1024-token tokenizer. Build time: a few seconds.
- `tiny_models_quick` -> `TinyModels` with random weights (no pre-training), same tokenizer settings; for tests
  that only need shapes and plumbing.
- `tiny_student_other_vocab` -> `Path` of a student whose tokenizer has 512 tokens: a vocabulary different from
  `tiny_models`' (for the mismatched-tokenizer tests of the cache and the losses).
- `tiny_family` -> a function `arch -> TinyModels`: the teacher and student of one model family
  (`grpo_kd.tiny_families`: "mistral", "gemma3", "gpt2"; "llama" gives `tiny_models`), built once per session
  with a short pre-training (teacher 8 steps, student 2): the family tests need structure, not skill.
- `faroese_dir` -> `Path` of ../shared/data/faroese (CoNLL-U files); skips the test when it is absent.

The environment is set before anything imports transformers or Triton: `TRITON_INTERPRET=1` (kernels run on
the CPU through the Triton interpreter), `HF_HUB_OFFLINE=1` (no test may reach the model hub) and
`OMP_NUM_THREADS=1` (the tiny models run up to 10x slower with two threads on a busy 2-core machine). Each is only
a default: a variable already set in the environment wins.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: more threads only oversubscribe a shared CPU

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FAROESE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faroese"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from grpo_kd.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), pretrain_steps=40, student_pretrain_steps=10)


@pytest.fixture(scope="session")
def tiny_models_quick(tmp_path_factory):
    from grpo_kd.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models-quick"), pretrain_steps=0)


@pytest.fixture(scope="session")
def tiny_student_other_vocab(tmp_path_factory) -> Path:
    from grpo_kd.tiny import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("tiny-other-vocab") / "student", vocab_size=512)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, request):
    from grpo_kd.tiny import build_tiny_models

    built = {}

    def build(arch: str):
        if arch == "llama":
            return request.getfixturevalue("tiny_models")
        if arch not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[arch] = build_tiny_models(out, arch=arch, pretrain_steps=8, student_pretrain_steps=2)
        return built[arch]

    return build


@pytest.fixture(scope="session")
def faroese_dir() -> Path:
    if not FAROESE_DIR.is_dir() or not any(FAROESE_DIR.glob("*.conllu")):
        pytest.skip(f"Faroese data not found at {FAROESE_DIR} (it lives beside the project, in ../shared/data)")
    return FAROESE_DIR
