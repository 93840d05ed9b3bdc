"""L_PT: the language-modelling loss on pre-training text that MiniLLM (and GRPO-KD's MiniLLM-style variant)
adds to keep the student a good language model while it chases the teacher.

    L_PT = -1/N_PT sum_{b, s} log q_theta(x_{b,s+1} | x_{b,<=s})       over the step's pre-training tokens

The text (`data.pretrain_text`, read by `grpo_kd.data.load_texts`) is tokenized once into one stream (eos between
texts) and cut into blocks of `loss.pt.seq_len` tokens. Optimizer step s of iteration i draws
`loss.pt.batch_size` blocks with a generator seeded by (seed, i, s) — so a resumed run draws the same blocks —
and rank r of W takes blocks r, r + W, ...; the loss is normalised by the token count of the whole draw.
"""

from __future__ import annotations

import numpy as np
import torch

from grpo_kd.config import Config
from grpo_kd.errors import GrpoKdError
from grpo_kd.kernels import linear_logprobs
from grpo_kd.models import lm_head


class PretrainBatches:
    """Blocks (num_blocks, S) of pre-training tokens and the per-step draw."""

    def __init__(self, cfg: Config, tokenizer):
        from grpo_kd.data import load_texts

        texts = load_texts(cfg.data.pretrain_text, field=cfg.data.text_field)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        stream: list[int] = []
        for text in texts:
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
        S = cfg.loss.pt.seq_len
        if len(stream) < S:
            raise GrpoKdError(f"data.pretrain_text gives {len(stream)} tokens, fewer than one block of "
                              f"loss.pt.seq_len={S}")
        count = len(stream) // S
        self.blocks = torch.tensor(stream[: count * S], dtype=torch.long).view(count, S)  # (num_blocks, S)
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


def pretrain_loss(module, policy, blocks: torch.Tensor, *, scale: float, impl: str = "auto") -> torch.Tensor:
    """scale * (summed NLL of blocks[:, 1:] given their prefixes); blocks (b, S)."""
    b, S = blocks.shape
    attention = torch.ones_like(blocks)
    starts = torch.ones(b, dtype=torch.long)  # "prompt" = the first token; the rest is predicted

    def nll(hidden, _values):  # hidden (b, S-1, H), inside the wrapped forward (the LM head whole under FSDP)
        head = lm_head(policy)
        logprobs, _, _ = linear_logprobs(
            hidden, head.weight, blocks[:, 1:].to(hidden.device), bias=head.bias, softcap=head.softcap, impl=impl
        )  # (b, S-1)
        return -logprobs.sum() * scale

    return module(blocks, attention, starts, S - 1, nll)
