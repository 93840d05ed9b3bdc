"""One place that decides where tensors live and in which dtype, and says why.

Every phase calls `infer_device()` and `choose_dtype()` instead of guessing on its own, so that a run on a laptop
and a run on an H100 differ only in what these two functions find, and the log says what they found.
"""

from __future__ import annotations

import gc
import logging
import weakref

import torch

from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def infer_device(requested: str = "auto") -> torch.device:
    """`"auto"` picks CUDA when present, else the CPU; anything else is taken as a torch device string."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise GrpoKdError(f"unknown device {requested!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GrpoKdError(f"device {requested!r} was asked for but CUDA is not available on this machine")
    return device


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise GrpoKdError(f"unknown dtype {name!r}; expected one of auto, {', '.join(sorted(_DTYPES))}") from None


def choose_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Return the dtype for weights on `device` and the reason, which callers log once.

    `"auto"` is bfloat16 on a GPU that supports it (the seed models are trained in it), float16 on an older GPU,
    and float32 on the CPU, where half-precision matrix products are slow and inexact.
    """
    if requested != "auto":
        return dtype_from_name(requested), f"dtype {requested} was set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bfloat16 because this GPU supports it"
        return torch.float16, "auto: float16 because this GPU has no bfloat16"
    return torch.float32, f"auto: float32 because the device is {device.type}"


def release_memory(*dropped: weakref.ref) -> None:
    """Return the memory of models nobody references any more (the caller drops its references first).

    `dropped`: weak references to what the caller let go of. The full garbage collection, which costs about 0.4 s
    in a process that has imported transformers (measured on a tiny run, a fifth of its iteration), then runs only
    if one of them is still alive, held by a reference cycle (as the first model loaded in a process can be: its
    loading frames are caught in a cycle that torch.fx.wrap makes while transformers lazily imports the model
    code); without `dropped` it always runs.
    """
    if not dropped or any(ref() is not None for ref in dropped):
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
