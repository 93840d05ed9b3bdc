"""bench_trl.py's `--peer distillation`: TRL's DistillationTrainer against grpo-kd's token-level reverse KL.

    python benchmarks/bench_trl.py --peer distillation --threads 1

Both do the same job: the student samples completions of the prompts (fully on-policy), a live teacher scores
exactly those tokens, and the student descends the per-token reverse KL(student || teacher), averaged over the
optimizer step's tokens, with the same lr (constant), optimizer steps, completions per step, new tokens,
temperature and gradient clipping, on the CPU in float32:

    TRL      DistillationTrainer (trl 1.16), beta = 1.0 (its generalised JSD at 1 is the reverse KL). It has no
             group size and no on-policy fraction (lmbda): every optimizer step generates one completion per row
             of its batch, so the prompt set is repeated G times and each step samples `micro_batch` fresh
             completions; the teacher's and the student's full-vocabulary logits are compared chunk by chunk
             (its chunked divergence kernel, exact over the vocabulary).
    grpo-kd  `loss.algorithm: privileged` with `teacher.kind: model` (configs/experiments/token_reverse_kl.yaml):
             the rollout samples all prompts x G completions at the start of the iteration, cache-teacher
             writes the teacher's top-k log-probs, the update takes the reverse KL over the k cached ids plus one
             "rest" bucket (`loss.teacher_kl.tail: bucket`), in `micro_batch` steps. No reference pass.

Besides time and memory, each in-process method's final student (after the same warm-up + measured iterations,
hence the same optimizer steps) is evaluated with grpo-kd's own `distill` suite (exact reverse KL over the whole
vocabulary, row-chunked) on held-out prompts neither trained on (the corpus lines after the training prompts),
beside the initial student. The CLI runs `--cli-iterations`, a different step count, so its student is not
evaluated (its update is the same code as the in-process run's).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path

import bench_trl as bt

# grpo-kd's side: configs/experiments/token_reverse_kl.yaml's loss, with the teacher a live model and no
# reference model (TRL's distillation has none either)
GRPOKD_LOSS = ["loss.algorithm=privileged", "teacher.kind=model", "loss.teacher_kl.divergence=reverse",
               "loss.teacher_kl.tail=bucket", "teacher.reference=false"]
LABELS = {"trl": "TRL DistillationTrainer, beta=1 (1 process)",
          "grpo-kd": "grpo-kd token reverse KL, 3 phases in 1 process (compute)",
          "grpo-kd-cli": "grpo-kd token reverse KL, CLI: 3 processes per iteration (as `grpo-kd run`)"}
EVALUATED = ("trl", "grpo-kd")  # the methods whose final student is evaluated (same optimizer steps)


def student_dir(s, method: str, repeat: int) -> Path:
    return Path(s.workdir) / "students" / f"{method}-{repeat}"


def worker_trl_distill(s) -> dict:
    """DistillationTrainer.train() for `warmup + iterations` x `steps_per_iteration` optimizer steps."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the library floor, as for grpo-kd)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    after_imports = bt.rss_now()
    steps = s.steps_per_iteration
    clock, stamps = bt.iteration_clock(steps)
    tokenizer = AutoTokenizer.from_pretrained(f"{s.models}/student")
    teacher = AutoModelForCausalLM.from_pretrained(f"{s.models}/teacher", dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(s.prompts_file).read_text().splitlines()]
    rows = [p for p in prompts for _ in range(s.group_size)]  # G completions per prompt per iteration, as grpo-kd
    out_dir = tempfile.mkdtemp(dir=s.workdir, prefix="trl-distill-")
    args = DistillationConfig(**bt.trl_settings(s, out_dir), beta=1.0, model_init_kwargs={"dtype": "float32"})
    trainer = DistillationTrainer(model=f"{s.models}/student", teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": rows}), processing_class=tokenizer,
                                  callbacks=[clock])  # fmt: skip
    step_tokens: list[int] = []  # completion tokens of each optimizer step's generation
    generate = trainer._generate_and_score_completions

    def counted(inputs):
        batch = generate(inputs)
        step_tokens.append(int(batch["completion_mask"].sum()))
        return batch

    trainer._generate_and_score_completions = counted
    trainer.train()
    peak = bt.rss_peak()  # before saving, which is no part of training
    if s.keep_student:
        trainer.save_model(s.keep_student)
        tokenizer.save_pretrained(s.keep_student)
    shutil.rmtree(out_dir, ignore_errors=True)
    tokens = [sum(step_tokens[i : i + steps]) for i in range(0, len(step_tokens), steps)]
    return {"iteration_s": bt.split_iterations(stamps, s.warmup), "completion_tokens": tokens[s.warmup:],
            "rss_after_imports": after_imports, "peak_rss": peak}


# ----------------------------------------------------------------------------------------------- held-out KL


def heldout_prompts(work: Path, train_count: int, count: int) -> list[str]:
    """The `count` prompts after the training ones (the same rule as bench_trl.write_prompts): never trained on."""
    path = work / "heldout.jsonl"
    bt.write_prompts(path, train_count + count)
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()[train_count:]]


def evaluate_students(s, cfg, prompts: list[str], repeats: int) -> dict:
    """grpo-kd's `distill` suite (exact per-token reverse KL etc. on the student's samples of `prompts`) for the
    initial student and every kept final student; `cfg` carries the models, seed and eval settings."""
    from grpo_kd.evaluate.suite import evaluate_checkpoint

    cfg.eval.max_new_tokens, cfg.eval.temperature = s.max_new_tokens, s.temperature
    cfg.eval.max_examples, cfg.eval.batch_size = len(prompts), s.micro_batch
    teacher = f"{s.models}/teacher"

    def distill(checkpoint) -> dict:
        result = evaluate_checkpoint(str(checkpoint), teacher, suites=["distill"], cfg=cfg, prompts=prompts)["distill"]
        return {k: result[k] for k in ("reverse_kl", "forward_kl", "top1_agreement", "teacher_logprob_per_token")}

    out = {"prompts": len(prompts), "initial": distill(f"{s.models}/student")}
    for method in EVALUATED:
        runs = [distill(student_dir(s, method, r)) for r in range(repeats)]
        out[method] = {"runs": runs, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
    return out


def markdown_section(report: dict) -> list[str]:
    s, ev = report["settings"], report["heldout"]
    steps = (s["warmup"] + s["iterations"]) * s["steps_per_iteration"]
    lines = ["", f"Held-out: grpo-kd's `distill` suite on {ev['prompts']} prompts neither method trained on, one "
             f"sampled completion each ({s['max_new_tokens']} new tokens, temperature {s['temperature']}, seed "
             f"{s['seed']}); reverse and forward KL exact over the vocabulary, nats per token. Final students after "
             f"{steps} optimizer steps ({s['warmup'] + s['iterations']} iterations); median over {report['repeats']} "
             "runs (range).", "",
             "| student | reverse KL (range) | forward KL | top-1 agreement | teacher log-prob / token |",
             "|---|---|---|---|---|"]
    initial = ev["initial"]
    lines.append(f"| initial student | {initial['reverse_kl']:.4f} | {initial['forward_kl']:.4f} "
                 f"| {initial['top1_agreement']:.3f} | {initial['teacher_logprob_per_token']:.3f} |")
    for method in EVALUATED:
        m = ev[method]
        rkl = [r["reverse_kl"] for r in m["runs"]]
        lines.append(f"| {LABELS[method]} | {m['reverse_kl']:.4f} ({min(rkl):.4f}-{max(rkl):.4f}) "
                     f"| {m['forward_kl']:.4f} | {m['top1_agreement']:.3f} | {m['teacher_logprob_per_token']:.3f} |")
    return lines


def settings_text(report: dict) -> str:
    s = report["settings"]
    return (f"{s['prompts']} prompts x G={s['group_size']}, {s['max_new_tokens']} new tokens, temperature "
            f"{s['temperature']}, lr {s['lr']} constant, {s['micro_batch']} completions per optimizer step "
            f"({s['steps_per_iteration']} steps per iteration), loss = per-token reverse KL(student || teacher) on "
            f"the student's own samples: TRL exact over the vocabulary (beta=1, fresh samples every step), grpo-kd "
            f"over the teacher's top-{s['top_k']} + a tail bucket (samples drawn once per iteration). ")
