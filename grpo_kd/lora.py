"""LoRA on the student's text decoder, and the train-mode setup of a student.

Key design choice: LoRA targets are named by the last component of a module's name (`q_proj`, GPT-2's `c_attn`),
as in the config, but only layers inside the text decoder (`get_decoder()`) are adapted, so a multimodal
checkpoint's vision tower (Gemma-3's SigLIP has `q_proj` too) is left alone; linear layers are `nn.Linear`
(bitsandbytes' 4-bit ones included) and GPT-2's `Conv1D`, whose weight is stored transposed (peft's
`fan_in_fan_out`).
"""

from __future__ import annotations

import logging
import re

from torch import nn

from grpo_kd.config import ModelConfig
from grpo_kd.errors import GrpoKdError

log = logging.getLogger(__name__)


def lora_targets(model: nn.Module, wanted: list[str]) -> tuple[str, bool]:
    """(a peft `target_modules` pattern, fan_in_fan_out): the layers named in `wanted` (last name component) that
    are linear layers (`nn.Linear`, bitsandbytes' 4-bit ones, or GPT-2's `Conv1D`) of the text decoder only — not
    of a vision tower beside it (Gemma-3). An error naming the decoder's linear layers if none matches."""
    from transformers.pytorch_utils import Conv1D

    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    layers = {name: module for name, module in decoder.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    present = [name for name in wanted if name in names]
    if not present:
        raise GrpoKdError(
            f"none of the LoRA target modules {wanted} is in the model; its linear layers are: {', '.join(names)}"
        )
    missing = [name for name in wanted if name not in names]
    if missing:
        log.info("LoRA: target modules %s are not in this model and are skipped", missing)
    conv = {isinstance(m, Conv1D) for n, m in layers.items() if n.rsplit(".", 1)[-1] in present}
    if len(conv) > 1:
        raise GrpoKdError(f"LoRA target modules {present} mix Conv1D and linear layers; choose one kind")
    within = re.escape(prefix) + r"\." if prefix else ""
    return f"{within}(.*\\.)?({'|'.join(map(re.escape, present))})", conv == {True}


def add_lora(model, cfg: ModelConfig):
    """`model` wrapped by peft with fresh LoRA adapters on `cfg.lora_target_modules` of its text decoder."""
    from peft import LoraConfig, get_peft_model  # 2.6-4.0 s after transformers: only with LoRA

    targets, fan_in_fan_out = lora_targets(model, cfg.lora_target_modules)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,  # Conv1D stores its weight as (in, out)
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def disable_dropout(model) -> None:
    """Switch off the model's own dropout (GPT-2 and GPT-SW3 checkpoints ship 0.1 on attention, residuals and
    embeddings). The on-policy losses compare the training forward with the sampling forward (the first importance
    ratio is 1) and the update runs in train mode (for gradient checkpointing); dropout would make every ratio
    noise. LoRA's own dropout (`model.lora_dropout`) is a setting of the run and is kept."""
    switched = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            if module.p > 0 and "lora_dropout" not in name:
                module.p, switched = 0.0, switched + 1
        elif isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout, switched = 0.0, switched + 1  # a rate handed to the attention kernel
    if switched:
        log.info("dropout switched off in %d modules of the student", switched)
