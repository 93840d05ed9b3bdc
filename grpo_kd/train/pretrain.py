"""L_PT: the language-modelling loss on pre-training text that MiniLLM (and GRPO-KD's MiniLLM-style variant)
adds to keep the student a good language model while it chases the teacher.

    L_PT = -1/N_PT sum_{b, s} log q_theta(x_{b,s+1} | x_{b,<=s})       over the step's pre-training tokens

The text (`data.pretrain_text`, read by `grpo_kd.data.load_texts`) is tokenized once into one stream (eos between
texts) and cut into blocks of `loss.pt.seq_len` tokens (`text_blocks`). Optimizer step s of iteration i draws
`loss.pt.batch_size` blocks with a generator seeded by (seed, i, s) — so a resumed run draws the same blocks —
and rank r of W takes blocks r, r + W, ...; the loss is normalised by the token count of the whole draw.

`token_nll` is the one token-level cross-entropy of the package: L_PT and the SFT phase (sft.py) both call it.
"""

from __future__ import annotations

import numpy as np
import torch

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels import linear_logprobs
from grpo_kd.models import lm_head
from grpo_kd.train.policy import CompletionBatch


class PretrainBatches:
    """Blocks (num_blocks, S) of pre-training tokens and the per-step draw."""

    def __init__(self, cfg: Config, tokenizer):
        from grpo_kd.data import load_texts

        texts = load_texts(cfg.data.pretrain_text, field=cfg.data.text_field)
        self.blocks = text_blocks(texts, tokenizer, cfg.loss.pt.seq_len, "data.pretrain_text", "loss.pt.seq_len")
        self.seed = cfg.seed
        self.batch_size = cfg.loss.pt.batch_size

    @property
    def tokens_per_step(self) -> int:
        """Predicted tokens of one step's draw over all ranks: the L_PT normaliser."""
        return self.batch_size * (self.blocks.shape[1] - 1)

    def draw(self, iteration: int, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's blocks of optimizer step `step`, (b, S)."""
        rng = np.random.default_rng([self.seed, iteration, step])
        count = self.blocks.shape[0]
        index = rng.choice(count, size=self.batch_size, replace=count < self.batch_size)
        return self.blocks[torch.as_tensor(index[rank::world_size])]


def text_blocks(texts: list[str], tokenizer, seq_len: int, source: str, key: str) -> torch.Tensor:
    """`texts` tokenized into one stream (eos after each text), cut into blocks of `seq_len` tokens, (n, seq_len);
    `source` and `key` name the settings in the error."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
    if seq_len < 2 or len(stream) < seq_len:
        raise GrpoKdError(f"{source} gives {len(stream)} tokens, fewer than one block of {key}={seq_len} (which must "
                          "be at least 2)")
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)  # (n, seq_len)


def token_nll(module, policy, batch: CompletionBatch, *, scale: float, impl: str = "auto") -> torch.Tensor:
    """scale * the summed -log q_theta of the batch's completion tokens given what precedes them (0 on padding),
    through the (DDP/FSDP-wrapped) train module, at temperature 1."""

    def nll(hidden, _values):  # hidden (B, T, H), inside the wrapped forward (the LM head whole under FSDP)
        head = lm_head(policy)
        logprobs, _, _ = linear_logprobs(
            hidden, head.weight, batch.completion_ids.to(hidden.device), bias=head.bias, softcap=head.softcap,
            impl=impl,
        )  # (B, T)
        return -(logprobs * batch.completion_mask.to(logprobs)).sum() * scale

    return module(batch.input_ids, batch.attention_mask, batch.prompt_lengths, batch.completion_ids.shape[1], nll)


def pretrain_loss(module, policy, blocks: torch.Tensor, *, scale: float, impl: str = "auto") -> torch.Tensor:
    """scale * (summed NLL of blocks[:, 1:] given their prefixes); blocks (b, S)."""
    b, S = blocks.shape
    batch = CompletionBatch(  # "prompt" = the first token; the rest is predicted
        input_ids=blocks, attention_mask=torch.ones_like(blocks), completion_ids=blocks[:, 1:],
        completion_mask=torch.ones(b, S - 1), prompt_lengths=torch.ones(b, dtype=torch.long),
    )  # fmt: skip
    return token_nll(module, policy, batch, scale=scale, impl=impl)
