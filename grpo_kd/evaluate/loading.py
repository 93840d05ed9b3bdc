"""Loading a checkpoint to evaluate or export it: its model (full weights, or adapters on `model.path`) and the
tokenizer saved with it, else the config's. One way for `evaluate_checkpoint`, `export_checkpoint` and scripts.
"""

from __future__ import annotations

from pathlib import Path

from grpo_kd.config import Config


def checkpoint_tokenizer(checkpoint: str, cfg: Config):
    """The tokenizer saved with the checkpoint, else the config's student tokenizer."""
    from grpo_kd.models import load_tokenizer

    path = Path(checkpoint)
    has_own = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    source = str(path) if has_own or not path.is_dir() else (cfg.model.tokenizer or cfg.model.path)
    return load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)


def load_checkpoint(checkpoint: str, cfg: Config):
    """A checkpoint directory (full weights or adapters on cfg.model.path) or a hub id, in eval mode."""
    from grpo_kd.models import load_causal_lm, load_student, tokenizer_length

    if Path(checkpoint).expanduser().is_dir():
        return load_student(cfg.model, checkpoint=str(checkpoint), trainable=False)
    model = load_causal_lm(checkpoint, dtype=cfg.model.dtype, device=cfg.model.device,
                           trust_remote_code=cfg.model.trust_remote_code,
                           vocab_size=tokenizer_length(checkpoint, trust_remote_code=cfg.model.trust_remote_code))
    return model.eval().requires_grad_(False)
