"""`grpo-kd export CHECKPOINT OUT`: a standalone transformers model from any checkpoint, for EuroEval, vLLM and the hub.

    export_checkpoint("runs/x/checkpoints/iter_0003", "exports/x-3", cfg)   # OUT: config.json, model.safetensors,
                                                                           # tokenizer + chat template, export.json

A checkpoint is full weights (a `save_pretrained` directory), a peft LoRA adapter on `model.path`, or a training
checkpoint (RUN/checkpoints/iter_NNNN, whose model is in `model/`; PPO's value head there is left out). The
export is what `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load with no
grpo_kd code: weights in safetensors, the tokenizer with its chat template beside them, and `export.json` saying
what it was made from.

Key design choices: a LoRA adapter is merged into its base in float32 (merging in bfloat16 would round the sum
W + scale·BA a second time), then the weights are cast to the export dtype: `--dtype`, else `model.dtype`, else the
dtype the base was saved in. The directory is written through fsutil.atomic_path, so a killed export leaves
nothing that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_path

DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_SUBDIR = "model"  # grpo_kd.train.checkpoint.MODEL_DIR: where a training checkpoint keeps its model


def model_directory(checkpoint: str | Path) -> Path:
    """The `save_pretrained` directory of a checkpoint: the checkpoint itself, or its `model/`."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise GrpoKdError(f"checkpoint not found: {checkpoint}")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    if (path / MODEL_SUBDIR).is_dir():
        return model_directory(path / MODEL_SUBDIR)
    raise GrpoKdError(f"checkpoint {checkpoint} holds neither config.json nor adapter_config.json (nor a model/ with one)")


def is_standalone(path: str | Path) -> bool:
    """True for a hub id or a directory transformers loads as it is (config.json, no adapter); False for an
    adapter or a training checkpoint, which need `export_checkpoint` first."""
    path = Path(path)
    if not path.exists():
        return True  # a hub id
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def adapter_base(directory: Path) -> str | None:
    """The base model a peft adapter names in its adapter_config.json."""
    try:
        return json.loads((directory / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None


def _saved_dtype(directory: str) -> str:
    """The dtype a model directory was saved in (config.json `dtype` / `torch_dtype`), float32 if it says none."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "float32"
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return value if value in DTYPES[1:] else "float32"


def export_checkpoint(checkpoint: str | Path, out: str | Path, cfg: Config | None = None, *,
                      dtype: str = "auto") -> Path:
    """Write `checkpoint` as a standalone transformers model to `out` (replacing an earlier export); returns `out`.

    `cfg` (the run's config) gives the base of an adapter (`model.path`) and the tokenizer when the checkpoint has
    none; without it, the adapter's own base_model_name_or_path, and the checkpoint's own tokenizer."""
    import torch

    from grpo_kd.evaluate.loading import checkpoint_tokenizer, load_checkpoint

    if dtype not in DTYPES:
        raise GrpoKdError(f"unknown export dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    directory = model_directory(checkpoint)
    adapter = (directory / "adapter_config.json").is_file()
    if cfg is None:  # the checkpoint alone: an adapter says which base it was trained on
        base = adapter_base(directory) if adapter else str(directory)
        if not base:
            raise GrpoKdError(f"{directory} is an adapter that names no base model; pass --config with model.path")
        cfg = dataclasses.replace(Config(), model=dataclasses.replace(Config().model, path=base))
    base_dir = cfg.model.path if adapter else str(directory)
    target = dtype if dtype != "auto" else (cfg.model.dtype if cfg.model.dtype != "auto" else _saved_dtype(base_dir))
    merge_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32", lora=False))
    model = load_checkpoint(str(directory), merge_cfg)
    if adapter:
        model = model.merge_and_unload()  # W + scale * B @ A, in float32
    model = model.to(getattr(torch, target))
    tokenizer = checkpoint_tokenizer(str(directory), cfg)
    provenance = {"source": str(Path(checkpoint).resolve()), "base": base_dir if adapter else None,
                  "merged_adapter": adapter, "dtype": target,
                  "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "export.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return Path(out)
