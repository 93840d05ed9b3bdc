"""Test helpers for the cache tests: rollouts sampled from the tiny student with HF `generate`, written through
the rollout-store API, and a run directory with a config that points at the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from grpo_kd.cache.rollouts import RolloutRecord, write_rollout_shard
from grpo_kd.paths import RunPaths

PROMPTS = [
    "Tað var einaferð ein maður", "Í Føroyum eru", "The sea was calm and", "Hann gekk niður til",
    "Once upon a time", "Skipið sigldi út", "The old man said", "Hon segði at",
    "Seyðurin gekk á", "In the morning the", "Bátarnir komu heim", "Vit fóru til",
]


def sample_rollouts(student_path: Path, *, num_prompts: int, group_size: int, max_new_tokens: int, seed: int,
                    privileged: bool = False) -> list[RolloutRecord]:
    """Sample groups from the student with HF `generate`; behaviour log-probs from a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_kd.data import encode_prompt
    from grpo_kd.xtok import completion_text

    tok = AutoTokenizer.from_pretrained(str(student_path))
    model = AutoModelForCausalLM.from_pretrained(str(student_path), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    records = []
    for g in range(num_prompts):
        text = PROMPTS[g % len(PROMPTS)]
        prompt_ids = encode_prompt(tok, text, chat_template=False)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=group_size,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for s in range(group_size):
            completion = out[s, len(prompt_ids):].tolist()
            finish = "length"
            if tok.eos_token_id in completion:
                completion = completion[: completion.index(tok.eos_token_id) + 1]
                finish = "stop"
            full = torch.tensor([prompt_ids + completion])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt_ids) - 1 : -1]  # (C, V) predicts completion
            old = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            records.append(RolloutRecord(
                prompt_id=f"p{g}", group_id=g, sample_index=s, prompt_ids=prompt_ids, completion_ids=completion,
                old_logprobs=old.numpy(), finish_reason=finish, prompt_text=text,
                completion_text=completion_text(tok, completion),
                privileged=f"answer {g}: {PROMPTS[(g + 1) % len(PROMPTS)]}" if privileged else None))
    return records


def make_run(root: Path, models, *, name: str = "run", num_prompts: int = 6, group_size: int = 3,
             max_new_tokens: int = 10, num_shards: int = 2, privileged: bool = False, seed: int = 0,
             teacher: dict | None = None) -> tuple[Path, Path]:
    """A run directory with iteration 1's rollouts written in `num_shards` shards; returns (config, run dir)."""
    cfg = {
        "name": name, "output_dir": str(root), "seed": seed,
        "model": {"path": str(models.student)},
        "teacher": {"path": str(models.teacher), "top_k": 8, "token_budget": 96, **(teacher or {})},
    }
    config_path = root / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    records = sample_rollouts(models.student, num_prompts=num_prompts, group_size=group_size,
                              max_new_tokens=max_new_tokens, seed=seed, privileged=privileged)
    run_dir = root / name
    per_shard = np.array_split(np.arange(num_prompts), num_shards)
    for j, groups in enumerate(per_shard):
        part = [r for r in records if r.group_id in set(groups.tolist())]
        write_rollout_shard(RunPaths.of(run_dir).rollouts(1), j, part,
                            meta={"sampling": {"temperature": 1.0, "group_size": group_size}})
    return config_path, run_dir
