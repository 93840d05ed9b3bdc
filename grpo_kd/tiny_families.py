"""The architecture families of the experiments in miniature: Mistral, Gemma-3 and GPT-2 (GPT-SW3) beside Llama.

Each family is built as the very classes a user of the real checkpoint gets from `AutoModelForCausalLM` and
`AutoTokenizer`, with the same kind of tokenizer (trained here on local text, no hub), the same special tokens,
chat format and LM-head layout, only tiny:

| family  | stands for                          | model class (AutoModelForCausalLM)  | tokenizer (AutoTokenizer)        | head    |
|---------|-------------------------------------|-------------------------------------|----------------------------------|---------|
| llama   | LLaMA-2-7B / -70B-chat              | LlamaForCausalLM                    | byte-level BPE (grpo_kd.tiny)    | see tiny|
| mistral | Mistral-7B                          | MistralForCausalLM                  | LlamaTokenizer: BPE, byte fallback, <s> </s>, no pad | untied |
| gemma3  | gemma-3-27b-it                      | Gemma3ForConditionalGeneration      | GemmaTokenizer: BPE, byte fallback, <bos>, turns | tied, rows padded to 64 |
| gpt2    | GPT-SW3-6.7B                        | GPT2LMHeadModel (Conv1D layers)     | GPTSw3Tokenizer: SentencePiece, <|endoftext|> | tied |

Key design choice: the Gemma-3 checkpoint is multimodal (`model_type: gemma3`), and transformers maps that
config to `Gemma3ForConditionalGeneration` in `AutoModelForCausalLM`, so that is what the tiny one is: a SigLIP
vision tower of one layer beside the text decoder, tied embeddings, `final_logit_softcapping` as the real config
has it (None for Gemma-3), and more embedding rows than tokens (the real one has 262,208 rows for 262,145 tokens:
rows padded to a multiple of 64). The new families use a head size of 64, which the vLLM CPU build supports.
The Llama family is `grpo_kd.tiny`'s own, unchanged, so that builds made before the families existed stay
byte-identical.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import torch

from grpo_kd.errors import GrpoKdError

FAMILIES = ("llama", "mistral", "gemma3", "gpt2")
HEAD_DIM = 64  # attention head size of the new families (vLLM's CPU attention supports it)
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # SentencePiece-style byte fallback pieces


@dataclass(frozen=True)
class TinyArch:
    """The shape of one tiny model (the head size is `hidden_size // num_heads`, or 64 for Gemma-3)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool
    head_dim: int | None = None  # None: the family's own; vLLM's CPU attention needs one of 32, 64, 80, ...


# The Llama family: grpo_kd.tiny's byte-level BPE tokenizer and its shapes, as they were before the families.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
# One turn: "<|role|>\n content </s>\n"; the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEACHER_ARCH = TinyArch(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256, tie_embeddings=False)
STUDENT_ARCH = TinyArch(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, tie_embeddings=True)


@dataclass(frozen=True)
class Family:
    """What makes a family itself, as the structural tests check it."""

    name: str
    stands_for: str  # the checkpoints of the experiments
    model_class: str  # what AutoModelForCausalLM instantiates for them
    tokenizer_class: str  # what AutoTokenizer instantiates for them
    specials: tuple[str, ...]  # ids 0.. of the vocabulary, in this order
    bos: str | None
    eos: str
    pad: str | None  # None: the real tokenizer has no pad token (load_tokenizer pads with eos)
    chat_template: str | None
    teacher_arch: TinyArch
    student_arch: TinyArch


# Chat formats, written for these tiny tokenizers after the formats the real models document.
MISTRAL_CHAT = (  # [INST] turns; a system message is put before the first user message
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA_CHAT = (  # <start_of_turn>user|model ... <end_of_turn>; a system message opens the first user turn
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GPT_SW3_CHAT = (  # GPT-SW3-instruct: <|endoftext|><s>, then "\nUser:\n...\n<s>" / "\nBot:\n...\n<s>" turns
    "{{ eos_token }}{{ bos_token }}{% for message in messages %}"
    "{{ '\n' + ('Bot' if message['role'] == 'assistant' else 'User') + ':\n' + message['content'] + '\n' }}"
    "{{ bos_token }}{% endfor %}{% if add_generation_prompt %}{{ '\nBot:\n' }}{% endif %}"
)
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")
GEMMA_IMAGE_TOKEN = "<image_soft_token>"  # after the trained vocabulary, as in the real tokenizer


def _llama_family() -> Family:
    return Family("llama", "LLaMA-2-7B, LLaMA-2-70B-chat", "LlamaForCausalLM", "TokenizersBackend",
                  tuple(SPECIAL_TOKENS), "<s>", "</s>", "<pad>", CHAT_TEMPLATE, TEACHER_ARCH, STUDENT_ARCH)


_NEW_FAMILIES = {
    "mistral": Family(
        "mistral", "Mistral-7B", "MistralForCausalLM", "LlamaTokenizer", ("<unk>", "<s>", "</s>"), "<s>", "</s>",
        None, MISTRAL_CHAT,
        TinyArch(hidden_size=192, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=384, tie_embeddings=False),
        TinyArch(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256, tie_embeddings=False),
    ),
    "gemma3": Family(
        "gemma3", "gemma-3-27b-it", "Gemma3ForConditionalGeneration", "GemmaTokenizer",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>") + GEMMA_TURN_TOKENS, "<bos>", "<eos>", "<pad>", GEMMA_CHAT,
        TinyArch(hidden_size=128, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=256, tie_embeddings=True),
        TinyArch(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, tie_embeddings=True),
    ),
    "gpt2": Family(
        "gpt2", "GPT-SW3-6.7B", "GPT2LMHeadModel", "GPTSw3Tokenizer", ("<pad>", "<unk>", "<s>", "<|endoftext|>"),
        "<s>", "<|endoftext|>", "<pad>", GPT_SW3_CHAT,
        TinyArch(hidden_size=192, num_layers=3, num_heads=3, num_kv_heads=3, intermediate_size=768, tie_embeddings=True),
        TinyArch(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=512, tie_embeddings=True),
    ),
}


def family(name: str) -> Family:
    """The family called `name`; a one-line error naming the others for anything else."""
    if name == "llama":
        return _llama_family()
    if name not in _NEW_FAMILIES:
        raise GrpoKdError(f"unknown architecture family {name!r}; expected one of {', '.join(FAMILIES)}")
    return _NEW_FAMILIES[name]


# ---------------------------------------------------------------------------------------------- tokenizers


def _bpe_with_byte_fallback(texts: list[str], vocab_size: int, specials: tuple[str, ...], prefix_space: bool):
    """(vocab {piece: id}, merges [(a, b)]) of a SentencePiece-style BPE: pieces start with "▁" where a space was,
    unknown characters fall back to the 256 byte pieces. Ids: the specials, the bytes, then the learned pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < len(specials) + len(BYTE_TOKENS) + 16:
        raise GrpoKdError(f"vocab_size {vocab_size} is too small for a BPE with byte fallback "
                          f"(at least {len(specials) + len(BYTE_TOKENS) + 16})")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix_space else "never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials) + BYTE_TOKENS,
                                  limit_alphabet=160, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _mistral_tokenizer(texts: list[str], vocab_size: int, fam: Family):
    from transformers import LlamaTokenizer

    vocab, merges = _bpe_with_byte_fallback(texts, vocab_size, fam.specials, prefix_space=True)
    return LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          add_bos_token=True, add_eos_token=False, legacy=False)


def _gemma_tokenizer(texts: list[str], vocab_size: int, fam: Family):
    from transformers import GemmaTokenizer

    vocab, merges = _bpe_with_byte_fallback(texts, vocab_size, fam.specials, prefix_space=False)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                               extra_special_tokens=list(GEMMA_TURN_TOKENS))
    tokenizer.add_tokens([GEMMA_IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def _gpt_sw3_tokenizer(texts: list[str], vocab_size: int, fam: Family, work_dir):
    """A SentencePiece BPE model (byte fallback, no normalisation: GPTSw3Tokenizer normalises itself) with
    GPT-SW3's ids: 0 <pad>, 1 <unk>, 2 <s>, 3 <|endoftext|>."""
    import sentencepiece as spm
    from transformers import GPTSw3Tokenizer

    if vocab_size < len(fam.specials) + len(BYTE_TOKENS) + 16:
        raise GrpoKdError(f"vocab_size {vocab_size} is too small for a BPE with byte fallback "
                          f"(at least {len(fam.specials) + len(BYTE_TOKENS) + 16})")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9999, pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>",
        unk_piece="<unk>", bos_piece="<s>", eos_piece="<|endoftext|>", normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2,
    )  # fmt: skip
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "spiece.model"
    path.write_bytes(model.getvalue())
    return GPTSw3Tokenizer(str(path), name_or_path="tiny-gpt-sw3", pad_token="<pad>", unk_token="<unk>",
                           bos_token="<s>", eos_token="<|endoftext|>")


def train_family_tokenizer(name: str, texts: list[str], vocab_size: int, work_dir):
    """The tokenizer of family `name` (not llama: see `grpo_kd.tiny.train_tokenizer`), trained on `texts`, with
    the family's chat template. `work_dir` holds the SentencePiece model file GPTSw3Tokenizer reads."""
    fam = family(name)
    if name == "mistral":
        tokenizer = _mistral_tokenizer(texts, vocab_size, fam)
    elif name == "gemma3":
        tokenizer = _gemma_tokenizer(texts, vocab_size, fam)
    elif name == "gpt2":
        tokenizer = _gpt_sw3_tokenizer(texts, vocab_size, fam, work_dir)
    else:
        raise GrpoKdError(f"no family tokenizer for {name!r}")
    tokenizer.chat_template = fam.chat_template
    tokenizer.model_max_length = 512
    return tokenizer


# ---------------------------------------------------------------------------------------------- models


def padded_vocab(tokens: int, multiple: int = 64) -> int:
    """Embedding rows for `tokens` tokens rounded up to `multiple` (Gemma-3: 262,145 -> 262,208)."""
    return -(-tokens // multiple) * multiple


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def make_family_model(name: str, arch: TinyArch, tokenizer, seed: int, max_positions: int):
    """A randomly initialised model of family `name` (not llama) for `tokenizer`, in eval mode's dtype float32."""
    torch.manual_seed(seed)
    if name == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(
            vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim or arch.hidden_size // arch.num_heads,
            max_position_embeddings=max_positions, sliding_window=4096, tie_word_embeddings=arch.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
        )  # fmt: skip
        model = MistralForCausalLM(config)
    elif name == "gemma3":
        model = _make_gemma3(arch, tokenizer, max_positions)
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        if arch.head_dim not in (None, arch.hidden_size // arch.num_heads):
            raise GrpoKdError(f"a GPT-2 head is n_embd / n_head = {arch.hidden_size // arch.num_heads}: it has no "
                              f"head_dim setting (got {arch.head_dim})")

        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=max_positions, n_embd=arch.hidden_size, n_layer=arch.num_layers,
            n_head=arch.num_heads, n_inner=arch.intermediate_size, activation_function="gelu",
            tie_word_embeddings=arch.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    else:
        raise GrpoKdError(f"no family model for {name!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _make_gemma3(arch: TinyArch, tokenizer, max_positions: int):
    """Gemma3ForConditionalGeneration: a text decoder with 5:1 sliding/global layers (the last one global here),
    QK-norm, tied and padded embeddings, and a one-layer SigLIP vision tower; stops on <eos> and <end_of_turn>."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    pad, eos, bos = _ids(tokenizer, "<pad>", "<eos>", "<bos>")
    end_of_turn, boi, eoi, image = _ids(tokenizer, "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                                        GEMMA_IMAGE_TOKEN)
    layer_types = ["sliding_attention"] * (arch.num_layers - 1) + ["full_attention"]
    text = Gemma3TextConfig(
        vocab_size=padded_vocab(len(tokenizer)), hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim or HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM, sliding_window=32, layer_types=layer_types,
        max_position_embeddings=max_positions, final_logit_softcapping=None, attn_logit_softcapping=None,
        tie_word_embeddings=arch.tie_embeddings, pad_token_id=pad, bos_token_id=bos, eos_token_id=[eos, end_of_turn],
    )  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)  # Gemma-3's tower has no head
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
                          tie_word_embeddings=arch.tie_embeddings)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = [eos, end_of_turn]
    model.generation_config.bos_token_id = bos
    return model
