"""Shared setup of the update-phase tests: a run directory with real rollouts and a real teacher cache.

Rollouts are written by the rollout store's writer with behaviour log-probs from `completion_logprobs` (the one
function the rollout phase uses), the cache by the real cache-teacher pass (`run_teacher_pass`); the models are
the session's `tiny_models_quick`. Nothing is mocked. A run directory is copied for each test that trains, so
all runs see the very same rollouts and cache.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from grpo_kd.cache.rollouts import RolloutRecord, write_rollout_shard
from grpo_kd.config import ALGORITHM_SECTIONS, Config, load_config
from grpo_kd.paths import RunPaths, iteration_name

GROUPS = 6
GROUP_SIZE = 4


def make_config(run_dir: Path, models, *extra: str) -> Config:
    """Tiny settings: 6 groups of 4, micro-batch 4 x accumulation 2 = 2 groups per step, 3 steps per epoch."""
    overrides = [
        f"name={run_dir.name}", f"output_dir={run_dir.parent}", f"model.path={models.student}",
        f"teacher.path={models.teacher}", "teacher.top_k=8", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "optim.micro_batch_size=4", "optim.grad_accum=2", "optim.lr=0.003", "seed=3",
    ]
    algorithm = next((e.split("=", 1)[1] for e in extra if e.startswith("loss.algorithm=")), "grpo")
    if "policy" in ALGORITHM_SECTIONS[algorithm]:  # a section the algorithm does not read is refused
        overrides.append("loss.policy.beta=0.04")
    return load_config(None, overrides + list(extra))


def write_rollouts(cfg: Config, iteration: int = 1, *, seed: int = 0, privileged: bool = False) -> None:
    """GROUPS groups of GROUP_SIZE random completions (1-8 tokens) with the student's behaviour log-probs."""
    from grpo_kd.models import load_student, load_tokenizer, tokenizer_fingerprint
    from grpo_kd.train.policy import collate, completion_logprobs

    tokenizer = load_tokenizer(cfg.model.path)
    model = load_student(cfg.model, trainable=False)
    rng = random.Random(seed)
    records = []
    for g in range(GROUPS):
        prompt = [rng.randrange(10, 300) for _ in range(rng.randint(2, 5))]
        completions = [[rng.randrange(10, 300) for _ in range(rng.randint(1, 8))] for _ in range(GROUP_SIZE)]
        with torch.no_grad():
            logprobs, _ = completion_logprobs(model, collate([prompt] * GROUP_SIZE, completions),
                                              temperature=cfg.rollout.temperature)
        for s, completion in enumerate(completions):
            records.append(RolloutRecord(
                prompt_id=f"p{g}", group_id=g, sample_index=s, prompt_ids=prompt, completion_ids=completion,
                old_logprobs=logprobs[s, : len(completion)].tolist(), finish_reason="length",
                prompt_text=tokenizer.decode(prompt), completion_text=tokenizer.decode(completion),
                privileged="the answer" if privileged else None,
            ))  # fmt: skip
    meta = {"student": tokenizer_fingerprint(tokenizer), "sampling": {"temperature": cfg.rollout.temperature}}
    write_rollout_shard(RunPaths.of(cfg.run_dir).rollouts(iteration), 0, records, meta=meta)


def build_run(cfg: Config, iteration: int = 1, *, cache: bool = True, privileged: bool = False) -> None:
    from grpo_kd.train.teacher_pass import run_teacher_pass

    write_rollouts(cfg, iteration, privileged=privileged)
    if cache:
        run_teacher_pass(cfg, iteration=iteration, progress=False)


def copy_run(template: Path, target: Path, iteration: int = 1, *, teacher: bool = True) -> Path:
    """A fresh run directory with the template's rollouts (and cache) of `iteration`."""
    source = template / iteration_name(iteration)
    shutil.copytree(source / "rollouts", target / iteration_name(iteration) / "rollouts")
    if teacher:
        shutil.copytree(source / "teacher", target / iteration_name(iteration) / "teacher")
    return target


def final_weights(run_dir: Path, iteration: int = 1) -> dict[str, torch.Tensor]:
    model = RunPaths.of(run_dir).checkpoint(iteration) / "model"
    files = sorted(model.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def losses(run_dir: Path, iteration: int = 1) -> list[float]:
    from grpo_kd.train.metrics import MetricsLog

    return [r["loss"] for r in MetricsLog(RunPaths.of(run_dir).metrics).read() if r["iteration"] == iteration]


def assert_same_weights(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        err = (a[key].float() - b[key].float()).abs().max().item()
        assert err <= atol, f"{key}: max abs difference {err:.3g} > {atol}"


def first_step(cfg: Config, iteration: int = 1):
    """(the CacheBatch of optimizer step 1 on rank 0, float64 logits (B, T, V) of the initial student on it):
    the rows and the weights that step 1's logged metrics are computed from."""
    from grpo_kd.cache.reader import CacheReader, completion_hidden
    from grpo_kd.models import load_student
    from grpo_kd.train.update import make_plan, step_groups

    paths = RunPaths.of(cfg.run_dir)
    reader = CacheReader.open(paths.rollouts(iteration), paths.teacher(iteration))
    plan = make_plan(reader, cfg, world_size=1)
    batch = reader.batch(step_groups(plan, cfg.seed, iteration, 0, 0))
    model = load_student(cfg.model, trainable=False).double()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits  # (B, L, V)
    return batch, completion_hidden(logits, batch.prompt_lengths, batch.completion_ids.shape[1])  # (B, T, V)
