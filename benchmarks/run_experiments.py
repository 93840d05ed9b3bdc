"""Every algorithm on the tiny Faroese pair, before and after: the experiment of docs/experiments.md.

    python benchmarks/run_experiments.py                      # all 16 runs: ~7 min on 2 shared CPU cores
    python benchmarks/run_experiments.py --only grpo,minillm --iterations 2      # a quick look
    python benchmarks/run_experiments.py --executor cli       # each phase its own process, as `grpo-kd run`

Steps: build the tiny teacher and student (`grpo_kd.tiny`, 300 / 100 pre-training steps) on Faroese text
(../shared/data/faroese: FarPaHC train + OFT), evaluate the initial student (iteration 0), run each config of
`configs/experiments/` for its iterations (rollout -> cache-teacher -> update), evaluate its last checkpoint
on the same held-out prompts with the same sampling seed, and write

    benchmarks/results/<device>/experiments.json      every number, with the command and the machine load
    benchmarks/results/<device>/experiments.md        the before/after tables
    benchmarks/results/<device>/experiments_self_distill.png   distinct-n per iteration, beta = 0 vs beta > 0

Evaluation (`grpo_kd.evaluate.evaluate_checkpoint`): one sample per held-out prompt (the first 4 words of a
FarPaHC dev sentence, never trained on), scored by the teacher (mean log-prob per token, exact forward and reverse
KL per token), distinct-n of the samples, and perplexity on the dev sentences. The self-distillation runs are
also evaluated after every iteration against their own frozen base (the initial student): the base's
log-likelihood of the samples is their reward, distinct-n their collapse signal.

The privileged self-teacher runs on its own pair (`privileged_data`, `run_privileged`), because the shared tiny
student does not read its prompt: a student of the teacher's shape pre-trained for 1,000 steps on text where a
demonstration in capitals is followed by a sentence that continues in capitals. Its prompts carry such a
demonstration as privileged information; its target, the exact reverse KL between the student and its informed
self (the same checkpoint with the demonstration before the prompt) on held-out prompts, is measured every 4
iterations, with the fraction of capitals in its samples as the behaviour it should absorb.

Key design choice: `--executor inproc` (default) calls the three phase functions one after another in this process
(the same functions the phase commands call), because on a busy 2-core machine each extra process spends ~15 s
importing torch and transformers; `--executor cli` runs `grpo-kd run`'s local executor instead. Torch gets one
thread (tiny matrices; more threads oversubscribe a shared CPU). Every run starts from a clean run directory
unless `--resume`; finished evaluations are reused only with `--resume`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAROESE = ROOT.parent / "shared" / "data" / "faroese"
CORPUS = [FAROESE / "farpahc-train.conllu", FAROESE / "oft-part1.conllu"]
WORK = Path("runs/experiments")  # relative to ROOT, as in the configs
PRIVILEGED = WORK / "privileged-pair"  # the privileged run's text and its own tiny pair (privileged_data)
TEACHER_STEPS, STUDENT_STEPS = 300, 100
PRIVILEGED_STEPS = 1000  # the privileged run's own student: the teacher's shape, pre-trained until it reads its prompt


@dataclass(frozen=True)
class Experiment:
    key: str  # configs/experiments/<key>.yaml and the run name
    label: str
    target: str  # what the algorithm optimises, in words
    target_metric: tuple[str, str, str]  # (evaluation against, suite, key): "teacher" or "base"
    higher_is_better: bool
    every_iteration: bool = False  # evaluate every checkpoint (against the base), for the collapse figure
    config: str | None = None  # configs/experiments/<config>.yaml when it is not <key>.yaml (ablations)
    overrides: tuple[str, ...] = ()  # dotted overrides on top of the config (ablations)


EXPERIMENTS = [
    Experiment("grpo", "GRPO, teacher log-lik. reward", "teacher log-lik. of samples",
               ("teacher", "distill", "teacher_logprob_mean"), True),
    Experiment("grpo_length_term", "GRPO, teacher log-lik. + length reward (ablation)", "teacher log-lik. of samples",
               ("teacher", "distill", "teacher_logprob_mean"), True, config="grpo",
               overrides=("loss.reward.weights={teacher_loglik: 1.0, length: 2.0}",)),
    Experiment("grpo_beta1_unscaled", "GRPO, teacher log-lik., beta 1, unscaled advantages (ablation)",
               "teacher log-lik. of samples", ("teacher", "distill", "teacher_logprob_mean"), True, config="grpo",
               overrides=("loss.policy.beta=1.0", "loss.grpo.scale_rewards=false")),
    Experiment("grpo_minillm_reward", "GRPO, MiniLLM-style reward + L_PT", "reverse KL to teacher",
               ("teacher", "distill", "reverse_kl"), False),
    Experiment("ppo", "PPO (value head, GAE), teacher log-lik. reward", "teacher log-lik. of samples",
               ("teacher", "distill", "teacher_logprob_mean"), True),
    Experiment("ppo_minillm_reward", "PPO, MiniLLM-style reward (per token) + L_PT", "reverse KL to teacher",
               ("teacher", "distill", "reverse_kl"), False),
    Experiment("ppo_beta1", "PPO, teacher log-lik. reward, beta 1 (ablation)", "teacher log-lik. of samples",
               ("teacher", "distill", "teacher_logprob_mean"), True, config="ppo", overrides=("loss.policy.beta=1.0",)),
    Experiment("minillm", "MiniLLM reverse-KL PG, teacher-mixed sampling + L_PT", "reverse KL to teacher",
               ("teacher", "distill", "reverse_kl"), False),
    Experiment("minillm_topk32", "MiniLLM, cache top-k 32 instead of 128 (ablation)", "reverse KL to teacher",
               ("teacher", "distill", "reverse_kl"), False, config="minillm", overrides=("teacher.top_k=32",)),
    Experiment("minillm_topk32_eq7", "MiniLLM, top-k 32, eq. 7's return taken literally (ablation)",
               "reverse KL to teacher", ("teacher", "distill", "reverse_kl"), False, config="minillm",
               overrides=("teacher.top_k=32", "loss.minillm.include_current=false", "loss.minillm.whiten=false",
                          "loss.minillm.gamma=1.0")),
    Experiment("token_reverse_kl", "token-level reverse KL to the teacher (reference point)", "reverse KL to teacher",
               ("teacher", "distill", "reverse_kl"), False),
    Experiment("self_distill_beta0", "self-distillation, beta = 0", "base log-lik. of samples",
               ("base", "distill", "teacher_logprob_mean"), True, every_iteration=True),
    Experiment("self_distill_beta05", "self-distillation, beta = 0.5", "base log-lik. of samples",
               ("base", "distill", "teacher_logprob_mean"), True, every_iteration=True),
    Experiment("privileged", "privileged-information self-teacher (frozen: the initial student)",
               "KL to the informed self, held-out prompts", ("informed", "informed", "reverse_kl_to_initial"), False),
    Experiment("privileged_current", "privileged self-teacher, the current student (ablation)",
               "KL to the current informed self, held-out prompts", ("informed", "informed", "reverse_kl"), False,
               config="privileged", overrides=("teacher.adapter=true",)),
]

# (label, suite, key, better) of the common table: every run against the tiny teacher.
COLUMNS = [
    ("teacher log-lik. (seq. mean)", "distill", "teacher_logprob_mean", "higher"),
    ("teacher log-lik. (per token)", "distill", "teacher_logprob_per_token", "higher"),
    ("KL(q‖p)", "distill", "reverse_kl", "lower"),
    ("KL(p‖q)", "distill", "forward_kl", "lower"),
    ("KL(q‖p) per completion", "distill", "reverse_kl_per_completion", "lower"),
    ("top-1 agree", "distill", "top1_agreement", "higher"),
    ("distinct-2", "diversity", "distinct_2", "higher"),
    ("length (tokens)", "diversity", "mean_length_tokens", None),
    ("perplexity", "perplexity", "perplexity", "lower"),
]
TRAIN_KEYS = ("reward/teacher_loglik", "reward/log_ratio", "reward/inverse_loss", "teacher_kl", "entropy",
              "reward/length", "kl", "pt_loss")

log = logging.getLogger("run_experiments")


# ---------------------------------------------------------------------------------------------- running


def load_cfg(exp: Experiment, iterations: int | None):
    from grpo_kd.config import load_config

    path = ROOT / "configs" / "experiments" / f"{exp.config or exp.key}.yaml"
    cfg = load_config(path, [f"name={exp.key}", *exp.overrides])
    if iterations is not None:
        cfg.iterations = iterations
    return cfg


def train(cfg, executor: str, resume: bool) -> dict:
    """All iterations of one run; returns {"seconds": total, "phases": [{iteration, rollout, teacher, update}]}."""
    from grpo_kd.slurm.plan import prepare_run

    run_dir = Path(cfg.output_dir) / cfg.name
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    cfg, paths = prepare_run(cfg)
    started = time.monotonic()
    phases = []
    if executor == "cli":
        from grpo_kd.slurm.local import run_local

        run_local(cfg, paths)
    else:
        from grpo_kd.paths import PHASES
        from grpo_kd.train.phases import run_phase

        for i in range(1, cfg.iterations + 1):
            seconds = {phase: run_phase(cfg, phase, i, resume=resume).seconds for phase in PHASES}
            phases.append({"iteration": i, "rollout": round(seconds["rollout"], 1),
                           "teacher": round(seconds["cache-teacher"], 1), "update": round(seconds["update"], 1)})
            log.info("%s iteration %d: rollout %.1fs, cache-teacher %.1fs, update %.1fs", cfg.name, i,
                     seconds["rollout"], seconds["cache-teacher"], seconds["update"])
    return {"seconds": round(time.monotonic() - started, 1), "phases": phases}


def checkpoint_model(cfg, iteration: int) -> str:
    """The model directory of checkpoint `iteration`; 0 is the initial student."""
    from grpo_kd.paths import RunPaths
    from grpo_kd.train.checkpoint import model_dir

    if iteration == 0:
        return cfg.model.path
    return str(model_dir(RunPaths.of(Path(cfg.output_dir) / cfg.name).checkpoint(iteration)))


def evaluate(cfg, model: str, teacher: str, suites: list[str], cache: Path, resume: bool) -> dict:
    """evaluate_checkpoint, kept as JSON in `cache` (reused with --resume when it scored the same model)."""
    from grpo_kd.evaluate.suite import evaluate_checkpoint
    from grpo_kd.fsutil import atomic_write_json

    if resume and cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("checkpoint") == model and saved.get("teacher") == teacher:
            return saved
    result = evaluate_checkpoint(model, teacher, suites=suites, cfg=cfg)
    atomic_write_json(cache, result)
    return result


def numbers(result: dict) -> dict:
    """The scalar metrics of an evaluation, flattened to "suite.key"."""
    out = {}
    for suite in ("distill", "diversity", "perplexity"):
        for key, value in (result.get(suite) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{suite}.{key}"] = value
    if out.get("distill.num_samples"):  # the pooled per-token KL x tokens per completion: nats per completion
        per_completion = out["distill.num_tokens"] / out["distill.num_samples"]
        out["distill.reverse_kl_per_completion"] = out["distill.reverse_kl"] * per_completion
    return out


def train_curve(cfg) -> dict[int, dict[str, float]]:
    """Per iteration, the training log's first step (fresh prompts, before any step on them) and epoch means."""
    from grpo_kd.paths import RunPaths

    rows = [json.loads(line) for line in RunPaths.of(Path(cfg.output_dir) / cfg.name).metrics.read_text().splitlines()
            if line.strip()]
    curve: dict[int, dict[str, float]] = {}
    for i in sorted({r["iteration"] for r in rows}):
        mine = [r for r in rows if r["iteration"] == i]
        first = mine[0]
        epoch0 = [r for r in mine if r["epoch"] == 0]
        curve[i] = {f"first_step.{k}": first[k] for k in TRAIN_KEYS if k in first}
        curve[i].update({f"epoch0_mean.{k}": sum(r[k] for r in epoch0) / len(epoch0) for k in TRAIN_KEYS
                         if all(k in r for r in epoch0)})
    return curve


# ---------------------------------------------------------------------------------------------- privileged run


def privileged_data(out: Path, seed: int = 0) -> dict[str, Path]:
    """The privileged run's text, written to `out` (deterministic in `seed`):

    corpus.jsonl   pre-training text of its tiny pair: every FarPaHC train and OFT sentence, and for each FarPaHC
                   train sentence of more than 6 words a document "demonstration\n\nsentence" whose demonstration is
                   another sentence; in half of them the demonstration is in capitals and so is the sentence after
                   its first 4 words, in the other half both are plain
    prompts.jsonl  {"prompt": first 4 words of such a sentence, "demonstration": another sentence in capitals}
    heldout.jsonl  the same for FarPaHC dev sentences (demonstrations from train)
    """
    from grpo_kd.data import split_prefix
    from grpo_kd.tiny import corpus_texts

    rng = random.Random(seed)
    train = corpus_texts([CORPUS[0]])
    sentences = [s for s in train if len(s.split(" ")) > 6]
    docs = train + corpus_texts(CORPUS[1:])
    prompts, heldout = [], []
    for i, sentence in enumerate(sentences):
        prefix, rest = split_prefix(sentence, 4)
        demonstration = rng.choice(sentences)
        if rng.random() < 0.5:
            docs.append(f"{demonstration.upper()}\n\n{prefix} {rest.upper()}")
        else:
            docs.append(f"{demonstration}\n\n{sentence}")
        prompts.append({"id": f"train-{i}", "prompt": prefix, "demonstration": rng.choice(sentences).upper()})
    dev = [s for s in corpus_texts([FAROESE / "farpahc-dev.conllu"]) if len(s.split(" ")) > 6]
    for i, sentence in enumerate(dev):
        heldout.append({"id": f"dev-{i}", "prompt": split_prefix(sentence, 4)[0],
                        "demonstration": rng.choice(sentences).upper()})
    rng.shuffle(docs)
    out.mkdir(parents=True, exist_ok=True)
    files = {"corpus": out / "corpus.jsonl", "prompts": out / "prompts.jsonl", "heldout": out / "heldout.jsonl"}
    for key, rows in (("corpus", [{"text": d} for d in docs]), ("prompts", prompts), ("heldout", heldout)):
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not files[key].is_file() or files[key].read_text(encoding="utf-8") != lines:
            files[key].write_text(lines, encoding="utf-8")  # rewritten only when changed: the build is reused
    return files


def capital_fraction(texts: list[str]) -> float:
    """The fraction of letters in `texts` that are capitals."""
    letters = [c for text in texts for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else float("nan")


def informed_self(cfg, model: str, cache: Path, resume: bool) -> dict:
    """The privileged run's target on held-out prompts: one sample per prompt without the demonstration, and the
    exact reverse KL per token, on those tokens, between the model and itself with the demonstration in its prompt
    (the informed self, `teacher.prompt_template`), and between the model and the initial student with the
    demonstration (a yardstick that does not move with training); also the capital fraction of those samples and
    of samples drawn with the demonstration, and perplexity on the plain FarPaHC dev text. Kept as JSON in
    `cache`."""
    from grpo_kd.data import encode_prompt, load_texts
    from grpo_kd.evaluate.distill import distill_metrics, student_side
    from grpo_kd.evaluate.generation import generate
    from grpo_kd.evaluate.perplexity import perplexity
    from grpo_kd.evaluate.suite import checkpoint_tokenizer, heldout_prompts, load_checkpoint
    from grpo_kd.fsutil import atomic_write_json

    if resume and cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("checkpoint") == model:
            return saved
    ev = cfg.eval
    tokenizer = checkpoint_tokenizer(model, cfg)
    net = load_checkpoint(model, cfg)
    plain = heldout_prompts(cfg, tokenizer)
    informed = heldout_prompts(cfg, tokenizer, privileged_template=cfg.teacher.prompt_template)
    sample = dict(max_new_tokens=ev.max_new_tokens, do_sample=True, temperature=ev.temperature,
                  batch_size=ev.batch_size, seed=cfg.seed)
    samples = generate(net, tokenizer, plain, description="sampling", **sample)
    informed_samples = generate(net, tokenizer, informed, description="sampling, informed", **sample)
    student = student_side(net, tokenizer, samples, plain, ev.batch_size)
    informed_ids = [encode_prompt(tokenizer, text, chat_template=False) for text in informed]  # as cache-teacher
    score = dict(batch_size=ev.batch_size, pad_id=tokenizer.pad_token_id, teacher_prompt_ids=informed_ids)
    to_self = distill_metrics(student, net, **score)
    initial = net if model == cfg.model.path else load_checkpoint(cfg.model.path, cfg)  # the fixed yardstick
    to_initial = distill_metrics(student, initial, **score)
    texts = load_texts(ev.heldout_text, limit=ev.max_examples)
    result = {
        "checkpoint": model,
        "informed.reverse_kl": to_self["reverse_kl"],
        "informed.forward_kl": to_self["forward_kl"],
        "informed.reverse_kl_to_initial": to_initial["reverse_kl"],
        "informed.capitals": capital_fraction([s.text for s in samples]),
        "informed.capitals_with_demonstration": capital_fraction([s.text for s in informed_samples]),
        "informed.num_tokens": to_self["num_tokens"],
        "perplexity.perplexity": perplexity(net, tokenizer, texts, batch_size=ev.batch_size)["perplexity"],
        "samples": [s.text for s in samples[:5]],
    }
    atomic_write_json(cache, result)
    return result


def run_privileged(exp: Experiment, args) -> dict:
    """The privileged self-teacher on its own tiny pair, measured against its informed self every 4 iterations."""
    from grpo_kd.tiny import TEACHER_ARCH, build_tiny_models

    cfg = load_cfg(exp, args.iterations)
    files = privileged_data(PRIVILEGED)
    build_tiny_models(PRIVILEGED / "models", [files["corpus"]], pretrain_steps=0,  # the teacher is unused
                      student_pretrain_steps=PRIVILEGED_STEPS, student_arch=TEACHER_ARCH)
    build = json.loads((PRIVILEGED / "models" / "build.json").read_text())
    log.info("== %s: %d iterations", exp.key, cfg.iterations)
    reports = Path(cfg.output_dir) / cfg.name / "reports"
    before = informed_self(cfg, cfg.model.path, PRIVILEGED / "eval_initial_informed.json", args.resume)
    timing = train(cfg, args.executor, args.resume)
    per_iteration = {0: before}
    for i in range(1, cfg.iterations + 1):
        if i % 4 == 0 or i == cfg.iterations:
            cache = reports / f"eval_iter_{i:04d}_informed.json"
            per_iteration[i] = informed_self(cfg, checkpoint_model(cfg, i), cache, args.resume)
    return {"label": exp.label, "target": exp.target, "target_metric": list(exp.target_metric),
            "higher_is_better": exp.higher_is_better, "iterations": cfg.iterations, "train": timing,
            "vs_informed": per_iteration, "train_curve": train_curve(cfg),
            "config": f"configs/experiments/{exp.config or exp.key}.yaml", "overrides": list(exp.overrides),
            "models": f"student {build['student']['parameters']:,} parameters ({PRIVILEGED_STEPS} steps, held-out "
                      f"perplexity {build['student']['heldout_perplexity']:.1f}), {build['vocab_size']}-token BPE, "
                      f"pre-trained on {PRIVILEGED / 'corpus.jsonl'}",
            "samples_after": per_iteration[cfg.iterations]["samples"]}


def run_experiment(exp: Experiment, args, initial: dict) -> dict:
    if exp.target_metric[0] == "informed":
        return run_privileged(exp, args)
    cfg = load_cfg(exp, args.iterations)
    teacher = str(ROOT / WORK / "models" / "teacher")
    base = cfg.model.path
    log.info("== %s: %d iterations", exp.key, cfg.iterations)
    timing = train(cfg, args.executor, args.resume)
    reports = Path(cfg.output_dir) / cfg.name / "reports"
    final = evaluate(cfg, checkpoint_model(cfg, cfg.iterations), teacher, ["perplexity", "distill", "diversity"],
                     reports / "eval_final_vs_teacher.json", args.resume)
    out = {"label": exp.label, "target": exp.target, "target_metric": list(exp.target_metric),
           "higher_is_better": exp.higher_is_better, "iterations": cfg.iterations, "train": timing,
           "before": initial["teacher"], "after": numbers(final), "train_curve": train_curve(cfg),
           "config": f"configs/experiments/{exp.config or exp.key}.yaml", "overrides": list(exp.overrides),
           "samples_after": final["diversity"]["samples"][:5]}
    if exp.target_metric[0] == "base" or exp.every_iteration:
        per_iteration = {0: initial["base"]}
        for i in range(1, cfg.iterations + 1):
            if not exp.every_iteration and i != cfg.iterations:
                continue
            result = evaluate(cfg, checkpoint_model(cfg, i), base, ["distill", "diversity"],
                              reports / f"eval_iter_{i:04d}_vs_base.json", args.resume)
            per_iteration[i] = numbers(result)
        out["vs_base"] = per_iteration
    return out


# ---------------------------------------------------------------------------------------------- output


def target_values(name: str, run: dict) -> tuple[float | None, float | None]:
    against, suite, key = run["target_metric"]
    if against == "train":
        curve = run["train_curve"]
        first, last = curve[min(curve)], curve[max(curve)]
        return first.get(f"first_step.{key}"), last.get(f"first_step.{key}")
    if against == "informed":
        vs = run["vs_informed"]
        return vs[min(vs)].get(f"{suite}.{key}"), vs[max(vs)].get(f"{suite}.{key}")
    if against == "base":
        vs = run["vs_base"]
        return vs[min(vs)].get(f"{suite}.{key}"), vs[max(vs)].get(f"{suite}.{key}")
    return run["before"].get(f"{suite}.{key}"), run["after"].get(f"{suite}.{key}")


def improved(before, after, higher: bool) -> bool | None:
    if before is None or after is None:
        return None
    return after > before if higher else after < before


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"


def markdown(summary: dict) -> str:
    runs = summary["runs"]
    lines = [f"# On-policy distillation experiments ({summary['device']})", "",
             f"Command: `{summary['command']}`  ", f"{summary['machine']}  ",
             f"Models: {summary['models']}  ", f"Data: {summary['data']}  ",
             (f"Wall time: {summary['seconds'] / 60:.1f} min; load average before / after: "
             f"{summary['load_before']} / {summary['load_after']}"), "",
             "## Each algorithm's own target, iteration 0 -> last", "",
             "| run | iterations | target | iteration 0 | last | improved | train time s |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        before, after = target_values(name, run)
        better = improved(before, after, run["higher_is_better"])
        verdict = "-" if better is None else ("yes" if better else "**no**")
        lines.append(f"| {run['label']} | {run['iterations']} | {run['target']} "
                     f"({'higher' if run['higher_is_better'] else 'lower'} is better) | {_fmt(before)} | "
                     f"{_fmt(after)} | {verdict} | {run['train']['seconds']:.0f} |")
    lines += ["", "## Every run against the tiny teacher, on the same held-out prompts", "",
              "Iteration 0 is the initial student (one row, shared by every run). Arrows: which way is better.", "",
              "| run | " + " | ".join(f"{c[0]} {'↑' if c[3] == 'higher' else '↓' if c[3] == 'lower' else ''}"
                                      for c in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 1) + "|"]
    rows = [("iteration 0 (initial student)", summary["initial"]["teacher"])]
    rows += [(r["label"], r["after"]) for r in runs.values() if "after" in r]
    for label, metrics in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics.get(f"{s}.{k}")) for _, s, k, _ in COLUMNS) + " |")
    sd = {n: r for n, r in runs.items() if "vs_base" in r and len(r["vs_base"]) > 2}
    if sd:
        lines += ["", "## Self-distillation per iteration, against the frozen base (the initial student)", "",
                  ("| run | iteration | base log-lik. (reward) | KL(q‖base) | distinct-1 | distinct-2 | distinct-3 | "
                  "length (tokens) |"), "|---|---|---|---|---|---|---|---|"]
        for run in sd.values():
            for i, m in run["vs_base"].items():
                lines.append(f"| {run['label']} | {i} | {_fmt(m.get('distill.teacher_logprob_mean'))} | "
                             f"{_fmt(m.get('distill.reverse_kl'))} | {_fmt(m.get('diversity.distinct_1'))} | "
                             f"{_fmt(m.get('diversity.distinct_2'))} | {_fmt(m.get('diversity.distinct_3'))} | "
                             f"{_fmt(m.get('diversity.mean_length_tokens'))} |")
    for run in (r for r in runs.values() if "vs_informed" in r):
        lines += ["", f"## {run['label']}: against its informed self, on held-out prompts", "",
                  f"Its own tiny pair: {run['models']}. Informed self: the same checkpoint with a demonstration in "
                  "capitals before the prompt. Capitals: the fraction of letters in capitals in the samples drawn "
                  "without the demonstration, and in samples drawn with it (informed).", "",
                  "| iteration | KL(q‖informed self) ↓ | KL(informed self‖q) ↓ | KL(q‖initial informed self) | "
                  "capitals in samples | capitals, informed | perplexity, plain dev text |",
                  "|---|---|---|---|---|---|---|"]
        for i, m in run["vs_informed"].items():
            lines.append(f"| {i} | {_fmt(m['informed.reverse_kl'])} | {_fmt(m['informed.forward_kl'])} | "
                         f"{_fmt(m['informed.reverse_kl_to_initial'])} | "
                         f"{_fmt(m['informed.capitals'])} | {_fmt(m['informed.capitals_with_demonstration'])} | "
                         f"{_fmt(m['perplexity.perplexity'])} |")
    return "\n".join(lines) + "\n"


def plot_self_distill(summary: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sd = {n: r for n, r in summary["runs"].items() if "vs_base" in r and len(r["vs_base"]) > 2}
    if not sd:
        return None
    panels = [("diversity.distinct_1", "distinct-1 of samples"), ("diversity.distinct_2", "distinct-2 of samples"),
              ("distill.teacher_logprob_mean", "base log-lik. of samples (reward)"),
              ("distill.reverse_kl", "KL(student || base) per token")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for run in sd.values():
            its = sorted(int(i) for i in run["vs_base"])
            ax.plot(its, [run["vs_base"][i].get(key) for i in its], marker="o", label=run["label"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Self-distillation on the tiny Faroese student: held-out samples after each iteration", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main


def prepare_process(threads: int) -> bool:
    """What every experiment script does first: work from the repository root, `threads` torch threads here and
    in phase processes, quiet library logs; False (with one line on stderr) when the Faroese text is absent."""
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the phase processes of --executor cli
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("grpo_kd", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(threads)
    if not all(p.is_file() for p in CORPUS):
        print(f"the experiment needs the Faroese text in {FAROESE} (absent here)", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--iterations", type=int, default=None, help="override every config's iterations")
    parser.add_argument("--executor", choices=("inproc", "cli"), default="inproc")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--resume", action="store_true", help="keep finished phases and evaluations")
    parser.add_argument("--results", default=None, help="output directory (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)

    if not prepare_process(args.threads):
        return 2
    import torch

    from grpo_kd.kernels.bench_report import device_slug
    from grpo_kd.tiny import build_tiny_models

    chosen = [e for e in EXPERIMENTS if not args.only or e.key in args.only.split(",")]
    started, load_before = time.monotonic(), os.getloadavg()
    models = build_tiny_models(WORK / "models", CORPUS, pretrain_steps=TEACHER_STEPS,
                               student_pretrain_steps=STUDENT_STEPS)
    build = json.loads((WORK / "models" / "build.json").read_text())
    cfg0 = load_cfg(EXPERIMENTS[0], args.iterations)  # the shared pair's held-out prompts and text
    initial = {
        "teacher": numbers(evaluate(cfg0, cfg0.model.path, str(ROOT / models.teacher),
                                    ["perplexity", "distill", "diversity"], WORK / "eval_initial_vs_teacher.json",
                                    args.resume)),
        "base": numbers(evaluate(cfg0, cfg0.model.path, cfg0.model.path, ["distill", "diversity"],
                                 WORK / "eval_initial_vs_base.json", args.resume)),
    }
    runs = {e.key: run_experiment(e, args, initial) for e in chosen}
    device = device_slug("cpu")
    out = Path(args.results) if args.results else ROOT / "benchmarks" / "results" / device
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": device,
        "command": " ".join(["python benchmarks/run_experiments.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs (shared), executor "
                   f"{args.executor}",
        "models": f"teacher {build['teacher']['parameters']:,} parameters ({TEACHER_STEPS} steps, held-out perplexity "
                  f"{build['teacher']['heldout_perplexity']:.1f}); student {build['student']['parameters']:,} "
                  f"({STUDENT_STEPS} steps, {build['student']['heldout_perplexity']:.1f}); shared {build['vocab_size']}"
                  "-token byte-level BPE",
        "data": "prompts: first 4 words of FarPaHC train sentences; held-out prompts and perplexity text: FarPaHC dev "
                f"({cfg0.eval.max_examples} sentences); L_PT text: OFT (from {FAROESE.relative_to(ROOT.parent)})",
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
        "initial": initial, "runs": runs,
    }
    (out / "experiments.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "experiments.md").write_text(markdown(summary), encoding="utf-8")
    plot = plot_self_distill(summary, out / "experiments_self_distill.png")
    print(markdown(summary))
    print(f"wrote {out / 'experiments.json'}, {out / 'experiments.md'}" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
