"""Model loading in one place: causal LMs, the student with optional LoRA, teachers, fingerprints, LM-head parts.

Every phase loads models through these functions, so a tiny Llama on a laptop and a 70B teacher on a node take
the same code path. Key design choice: the fused kernels never see logits, only the final hidden states and the
LM-head weight, so this module exposes exactly those two (`final_hidden_states`, `lm_head`) and runs the
decoder without the head; `B x T x V` logits are never built.

    model = load_causal_lm("runs/tiny-models/teacher")           # local directory or hub id
    student = load_student(cfg.model, checkpoint="runs/x/checkpoints/iter_0001")
    hidden = final_hidden_states(student, input_ids, mask)      # (B, T, H)
    head = lm_head(student)                                      # weight (V, H), bias (V,) | None, softcap
    with adapters_disabled(student): base_hidden = final_hidden_states(student, input_ids, mask)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from grpo_kd.config import ModelConfig, TeacherConfig
from grpo_kd.device import choose_dtype, infer_device
from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import verify_checksums
from grpo_kd.lora import add_lora, disable_dropout

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config keys left out of the model fingerprint: they change with the library or the place, not the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


class LMHead(NamedTuple):
    """What the fused kernels need of the output layer: logits = softcap * tanh((hidden @ weight.T + bias) / softcap)."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,) or None
    softcap: float | None  # Gemma-2/3 final_logit_softcapping, None when the model has none


# ---------------------------------------------------------------------------------------------- locating


def resolve_source(path: str, what: str) -> str:
    """Return `path` if it is a local model directory or a plausible hub id; otherwise fail with one line."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise GrpoKdError(f"{what} {path!r} is a file; expected a model directory or a hub id")
        return str(local)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
    try:
        validate_repo_id(path)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise GrpoKdError(f"{what} not found: {path!r} is not a local directory (nor a valid hub id)")
    return path


def _load_failure(path: str, source: str, what: str, exc: BaseException) -> GrpoKdError:
    """One line for a failed from_pretrained: a broken local directory, or a hub id that could not be fetched."""
    from huggingface_hub import constants

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if type(exc).__name__ == "SafetensorError":
        first = f"a safetensors file is cut short or damaged ({first})"
    if _is_local(source):
        return GrpoKdError(f"could not load {what} from {path!r}: {first}")
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    return GrpoKdError(f"could not load {what} {path!r}: not a local directory and not on the hub{offline}: {first}")


def _is_local(path: str) -> bool:
    return Path(path).expanduser().is_dir()


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_local_weights(path: str | Path, what: str, *, verify: bool = True) -> None:
    """A local model or adapter directory must hold safetensors weights, which must match the checksums a
    grpo-kd checkpoint records (`fsutil.verify_checksums`; `verify=False` skips that read). Pickle weights
    (`pytorch_model.bin`) are refused, never loaded: unpickling runs code the file chooses."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return
    if not any(directory.glob("*.safetensors")):
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise GrpoKdError(f"{what} {str(path)!r} holds pickle weights only ({', '.join(pickles)}); grpo-kd loads "
                              "safetensors only (loading a pickle runs code from the file): convert it with "
                              "save_pretrained(..., safe_serialization=True) where you trust it")
        raise GrpoKdError(f"{what} {str(path)!r} holds no weights (no *.safetensors file)")
    if verify:
        verify_checksums(directory)


def check_model_source(path: str, what: str = "model", *, verify: bool = True) -> str:
    """The source `load_causal_lm` would load (a local directory or a hub id), checked without loading it: a
    local directory needs config.json and safetensors weights (matching its checksums unless `verify=False`).
    One-line `GrpoKdError` otherwise."""
    source = resolve_source(path, what)
    if _is_local(source):
        if not (Path(source) / "config.json").is_file():
            raise GrpoKdError(f"{what} directory {path!r} has no config.json; is it a save_pretrained directory?")
        check_local_weights(source, what, verify=verify)
    return source


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """An HF tokenizer from a directory or hub id, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    source = resolve_source(path, "tokenizer")
    if _is_local(source) and not any((Path(source) / name).is_file() for name in _TOKENIZER_FILES):
        raise GrpoKdError(f"no tokenizer in {path!r}: none of {', '.join(_TOKENIZER_FILES)} is there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise _load_failure(path, source, "tokenizer", exc) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GrpoKdError(f"tokenizer {path!r} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_length(path: str, *, trust_remote_code: bool = False) -> int:
    """len() of the tokenizer at `path`: the ids a model with it can emit (its embedding may have more rows)."""
    return len(load_tokenizer(path, trust_remote_code=trust_remote_code))


def _check_4bit(device: torch.device) -> None:
    """bitsandbytes is installed and quantises on `device` (a GPU, or the CPU through its CPU backend, measured with
    0.50.2); else one line naming why."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GrpoKdError("4-bit loading needs bitsandbytes: pip install 'grpo-kd[quant]'")
    if device.type == "cuda":
        return
    import bitsandbytes
    import bitsandbytes.functional as bnbf

    try:
        bnbf.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # bitsandbytes raises several types for a backend it lacks
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GrpoKdError(f"bitsandbytes {bitsandbytes.__version__} cannot quantise to 4 bits on {device}: {first}") from None


def _check_cpu_4bit_widths(source: str, path: str, trust_remote_code: bool) -> None:
    """bitsandbytes' CPU 4-bit kernels pack each linear layer's input in blocks of 64: a width that is not a
    multiple of 64 (only tiny models have one) fails at the first forward, so it is refused here."""
    from transformers import AutoConfig

    from grpo_kd.arch import arch_facts

    try:
        facts = arch_facts(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
    except GrpoKdError:
        return  # an architecture arch_facts does not read: let bitsandbytes judge
    widths = {"hidden_size": facts.hidden_size, "intermediate_size": facts.intermediate_size,
              "attention width": facts.num_heads * facts.head_dim}
    odd = {name: width for name, width in widths.items() if width % 64}
    if odd:
        raise GrpoKdError(f"bitsandbytes' CPU 4-bit kernels need layer widths that are multiples of 64; {path!r} has "
                          + ", ".join(f"{name} {width}" for name, width in odd.items()))


def load_causal_lm(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    load_in_4bit: bool = False,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    vocab_size: int | None = None,
):
    """Any causal LM from a local directory or a hub id, in the dtype and on the device chosen (and logged) here.

    With `device_map` (e.g. "auto" for a teacher spread over a node's GPUs) accelerate places the weights and
    `device` is only used to choose the dtype. `load_in_4bit` quantises the linear layers with bitsandbytes (NF4,
    compute in the chosen dtype; the LM head and embeddings stay unquantised), on a GPU or on the CPU.
    `vocab_size` is the tokenizer's length: LM-head rows beyond it (vocabulary padding) are left out of every
    distribution (`lm_head`, `limit_vocabulary`).
    """
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    source = check_model_source(path, "model")
    target = infer_device(device)
    torch_dtype, reason = choose_dtype(dtype, target)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        _check_4bit(target)
        if target.type == "cpu":
            _check_cpu_4bit_widths(source, path, trust_remote_code)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
        device_map = device_map or {"": (target.index or 0) if target.type == "cuda" else str(target)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or damaged file
        raise _load_failure(path, source, "model", exc) from None
    if device_map is None:
        model.to(target)
    if vocab_size is not None:
        limit_vocabulary(model, vocab_size)
    where = f"device_map={device_map!r}" if device_map is not None else f"device {target}"
    log.info("loaded %s on %s, %s (%s)%s", path, where, torch_dtype, reason, ", 4-bit" if load_in_4bit else "")
    return model


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def student_weights(cfg: ModelConfig, checkpoint: str | None) -> tuple[str, Path | None]:
    """(base weights, adapter directory | None) of the student at `checkpoint` (None: the initial model)."""
    if checkpoint is None:
        return cfg.path, None
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise GrpoKdError(f"student checkpoint not found: {checkpoint}")
    if (ckpt / "model").is_dir() and not (ckpt / "config.json").is_file() and not _is_adapter_dir(ckpt):
        ckpt = ckpt / "model"  # a training checkpoint: grpo_kd.train.checkpoint.MODEL_DIR
    if _is_adapter_dir(ckpt):
        return cfg.path, ckpt
    if (ckpt / "config.json").is_file():
        return str(ckpt), None
    raise GrpoKdError(f"student checkpoint {checkpoint} holds neither adapter_config.json nor config.json")


def load_student(cfg: ModelConfig, *, checkpoint: str | None = None, trainable: bool = True):
    """The student: base weights from `cfg.path` (or a full-weight `checkpoint`), LoRA adapters when `cfg.lora`.

    `checkpoint` is a directory written by `save_pretrained`: either a peft adapter (adapter_config.json; loaded
    onto the base from `cfg.path`) or full weights (config.json; replaces the base, and with `cfg.lora` gets
    fresh adapters); a training checkpoint (checkpoints/iter_NNNN, whose weights are in its `model/`) works too.
    `trainable=False` gives an eval-mode model with no parameter requiring grad.
    """
    base_path, adapter_dir = student_weights(cfg, checkpoint)
    model = load_causal_lm(
        base_path,
        dtype=cfg.dtype,
        device=cfg.device,
        load_in_4bit=cfg.load_in_4bit,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        vocab_size=tokenizer_length(_student_tokenizer_source(cfg, base_path), trust_remote_code=cfg.trust_remote_code),
    )
    if adapter_dir is not None:
        from peft import PeftModel  # 2.6-4.0 s after transformers: only for an adapter checkpoint
        from safetensors import SafetensorError

        check_local_weights(adapter_dir, "student adapter")
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        except (OSError, ValueError, SafetensorError) as exc:
            raise _load_failure(str(adapter_dir), str(adapter_dir), "student adapter", exc) from None
        log.info("student adapter loaded from %s", adapter_dir)
    elif cfg.lora:
        model = add_lora(model, cfg)
    if trainable:
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            hf = _hf_model(model)
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5 name; the old one warns
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def _student_tokenizer_source(cfg: ModelConfig, base_path: str) -> str:
    """`model.tokenizer`, else the weights' directory when a tokenizer is saved there (checkpoints hold one), else
    `model.path`."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if not _is_local(base_path) or any((Path(base_path) / name).is_file() for name in _TOKENIZER_FILES):
        return base_path
    return cfg.path


def load_teacher(teacher_cfg: TeacherConfig, student_cfg: ModelConfig, *, checkpoint: str | None = None):
    """The teacher in eval mode with no grad.

    kind "model": `teacher_cfg.path`, in the teacher's dtype, 4-bit and device map. The self-teachers
    ("self_base", "self_privileged") are the student's base from `student_cfg.path`; with `teacher_cfg.adapter`
    and a `checkpoint`, the student's trained weights or adapters are loaded too (the current student).
    """
    if teacher_cfg.kind == "model":
        model = load_causal_lm(
            teacher_cfg.path,
            dtype=teacher_cfg.dtype,
            device=student_cfg.device,
            load_in_4bit=teacher_cfg.load_in_4bit,
            device_map=teacher_cfg.device_map,
            trust_remote_code=teacher_cfg.trust_remote_code,
            attn_implementation=student_cfg.attn_implementation,
            vocab_size=tokenizer_length(teacher_cfg.path, trust_remote_code=teacher_cfg.trust_remote_code),
        )
    else:
        use_ckpt = checkpoint if teacher_cfg.adapter else None
        model = load_student(student_cfg, checkpoint=use_ckpt, trainable=False)
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- adapters


def as_peft_model(model) -> Any | None:
    """`model` if it is a peft model, else None. peft is not imported for the question: a model can only be a
    PeftModel once peft is imported, and importing it costs seconds of every phase's start-up."""
    peft = sys.modules.get("peft")
    return model if peft is not None and isinstance(model, peft.PeftModel) else None


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[Any]:
    """Run the frozen base with every adapter switched off; a no-op for a model without adapters."""
    peft_model = as_peft_model(model)
    if peft_model is not None:
        with peft_model.disable_adapter():
            yield model
        return
    if getattr(model, "_hf_peft_config_loaded", False):  # adapters attached through transformers' integration
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
        return
    yield model


# ---------------------------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Vocabulary size, a sha256 of the token->id mapping in id order, and the tokenizer's name."""
    vocab = tokenizer.get_vocab()
    pairs = sorted(((int(i), tok) for tok, i in vocab.items()))
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return {"vocab_size": int(len(tokenizer)), "vocab_hash": digest.hexdigest(), "name": tokenizer.name_or_path}


def same_vocabulary(fp_a: dict[str, Any], fp_b: dict[str, Any]) -> bool:
    """True when two tokenizer fingerprints map the same tokens to the same ids."""
    return fp_a.get("vocab_size") == fp_b.get("vocab_size") and fp_a.get("vocab_hash") == fp_b.get("vocab_hash")


def _hf_model(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    peft_model = as_peft_model(model)
    return peft_model.get_base_model() if peft_model is not None else model


def model_fingerprint(model) -> dict[str, Any]:
    """name_or_path, architecture, parameter count and a sha256 of the config (without volatile keys)."""
    hf = _hf_model(model)
    config = hf.config.to_dict()
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode("utf-8"))
    architectures = config.get("architectures") or [type(hf).__name__]
    return {
        "name": hf.name_or_path,
        "architecture": architectures[0],
        "num_parameters": int(sum(p.numel() for p in hf.parameters())),
        "config_hash": digest.hexdigest(),
    }


# ---------------------------------------------------------------------------------------------- LM-head parts


def _text_config(hf):
    config = hf.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, as `generate` uses them: (B, T) mask -> (B, T) int64, pads at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The hidden states that feed the LM head (after the final norm), without running the head.

    input_ids: (B, T) -> (B, T, H). With an attention mask and no `position_ids`, positions come from the mask
    (`position_ids_from_mask`), so a sequence gets the same hidden states whatever padding surrounds it, left
    or right, and the same as during `generate`. Works for a plain HF model and a peft-wrapped one (adapters as
    currently enabled, so under `adapters_disabled` it gives the base).
    """
    if position_ids is None and attention_mask is not None:
        position_ids = position_ids_from_mask(attention_mask)  # (B, T)
    decoder = _hf_model(model).get_decoder()
    out = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, return_dict=True
    )
    return out.last_hidden_state  # (B, T, H)


_VOCAB_ATTR = "grpo_kd_vocab_size"  # set on the transformers model by limit_vocabulary


def limit_vocabulary(model, vocab_size: int) -> None:
    """Let `lm_head` give only the first `vocab_size` rows (the tokenizer's ids) when the head has more.

    Checkpoints pad their embedding rows for speed (Gemma-3: 262,208 rows for 262,145 tokens). Those rows are
    no tokens: no sampler may draw them, no cache may list them and no loss may spread mass onto them, so every
    distribution of the project is the softmax over the tokenizer's ids, which the loaders fix here once.
    """
    hf = _hf_model(model)
    rows = hf.get_output_embeddings().weight.shape[0]
    if vocab_size > rows:
        raise GrpoKdError(f"the tokenizer has {vocab_size} tokens but the LM head of {hf.name_or_path!r} only "
                          f"{rows} rows; are the model and its tokenizer from one checkpoint?")
    if vocab_size < rows:
        setattr(hf, _VOCAB_ATTR, int(vocab_size))
        log.info("vocabulary: %d tokens, %d LM-head rows; the %d padding rows are left out", vocab_size, rows,
                 rows - vocab_size)


def lm_head(model) -> LMHead:
    """The output layer as (weight (V, H), bias (V,) | None, softcap | None), for the fused kernels; V is the
    tokenizer's length when the loader was given it (`limit_vocabulary`), else the head's rows."""
    hf = _hf_model(model)
    head = hf.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise GrpoKdError(
            f"the LM head of {hf.name_or_path!r} is a {type(head).__name__}, not a plain linear layer "
            "(LoRA on lm_head is not supported by the fused kernels)"
        )
    config = _text_config(hf)
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise GrpoKdError(f"{hf.name_or_path!r} scales its logits ({name}); the fused kernels do not support it")
    # The cap the model's own forward applies: Gemma2/3ForCausalLM read final_logit_softcapping from their config;
    # the multimodal Gemma3ForConditionalGeneration applies none (its text config's value is not read).
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    rows = getattr(hf, _VOCAB_ATTR, None)
    weight, bias = (head.weight, head.bias) if rows is None else (head.weight[:rows], _rows(head.bias, rows))
    return LMHead(weight=weight, bias=bias, softcap=float(softcap) if softcap else None)  # (V, H), (V,)


def _rows(bias: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if bias is None else bias[:rows]


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion: the model's generation config, else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    if not ids:
        raise GrpoKdError(f"the tokenizer {tokenizer.name_or_path!r} has no eos token to stop completions at")
    return {int(i) for i in ids}
