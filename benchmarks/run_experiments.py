"""Every algorithm on the tiny Faroese pair, before and after, over seeds: the experiment of docs/experiments.md.

    python benchmarks/run_experiments.py                      # all 15 experiments x seeds 0,1,2: ~25 min, 2 cores
    python benchmarks/run_experiments.py --only grpo,minillm --iterations 2 --seeds 0      # a quick look
    python benchmarks/run_experiments.py --executor cli       # each phase its own process, as `grpo-kd run`

Steps: build the tiny teacher and student (`grpo_kd.tiny`, 300 / 100 pre-training steps) on Faroese text
(../shared/data/faroese: FarPaHC train + OFT); for each config of `configs/experiments/` (and the ablations of
EXPERIMENTS) and each seed, train the run `runs/experiments/<key>-s<seed>` for its iterations (rollout ->
cache-teacher -> update, seed = the training and sampling seed) and evaluate its initial student and its last
checkpoint on the same held-out prompts, saved in the run's reports as `grpo-kd evaluate` saves them; then
`grpo-kd compare`'s function (`grpo_kd.evaluate.compare.compare_runs`, one group per experiment, its seeds
inside) gives the mean and 95% t interval of every number, and whether each run moved its own target beyond the
seed spread. Written to benchmarks/results/<device>/:

    experiments.md / .json                    the tables of docs/experiments.md, every number, the command, the load
    experiments_teacher.{md,json,png}         compare's full tables: every run against the tiny teacher
    experiments_self_distill.{md,json,png}    the self-distillation runs against their frozen base, per iteration
    experiments_privileged.{md,json,png}      the privileged runs against their informed self, every 4 iterations

Evaluation (`grpo_kd.evaluate.evaluate_checkpoint`): one sample per held-out prompt (the first 4 words of a
FarPaHC dev sentence, never trained on), scored by the teacher (mean log-prob per token, exact forward and reverse
KL per token), distinct-n of the samples, and perplexity on the dev sentences. The self-distillation runs are
also evaluated after every iteration against their own frozen base (the initial student; `"against": "base"`): the
base's log-likelihood of the samples is their reward, distinct-n their collapse signal.

The privileged self-teacher runs on its own pair (`privileged_data`, `build_privileged`), because the shared tiny
student does not read its prompt: a student of the teacher's shape pre-trained for 1,000 steps on text where a
demonstration in capitals is followed by a sentence that continues in capitals. Its prompts carry such a
demonstration as privileged information; its target, the exact reverse KL between the student and its informed
self (the same checkpoint with the demonstration before the prompt) on held-out prompts, is measured every 4
iterations, with the fraction of capitals in its samples as the behaviour it should absorb.

Key design choice: `--executor inproc` (default) calls the three phase functions one after another in this process
(the same functions the phase commands call), because on a busy 2-core machine each extra process spends ~15 s
importing torch and transformers; `--executor cli` runs `grpo-kd run`'s local executor instead. Torch gets one
thread (tiny matrices; more threads oversubscribe a shared CPU). Every run starts from a clean run directory;
`--reuse` keeps the runs whose last evaluation is written (to redo only the tables). The initial evaluation of a
seed is computed once and saved into every run of that seed (same model, prompts and sampling seed).
"""

from __future__ import annotations

import argparse
import copy
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
    Experiment("ppo_minillm_reward_norm", "PPO, MiniLLM-style reward per token / length + L_PT (ablation)",
               "reverse KL to teacher", ("teacher", "distill", "reverse_kl"), False, config="ppo_minillm_reward",
               overrides=("loss.ppo.length_normalize=true",)),
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

log = logging.getLogger("run_experiments")


# ---------------------------------------------------------------------------------------------- running


def load_cfg(exp: Experiment, iterations: int | None, seed: int = 0):
    """The run `<key>-s<seed>` of `exp`: its config with the training and sampling seed set."""
    from grpo_kd.config import load_config

    path = ROOT / "configs" / "experiments" / f"{exp.config or exp.key}.yaml"
    cfg = load_config(path, [f"name={exp.key}-s{seed}", f"seed={seed}", *exp.overrides])
    if iterations is not None:
        cfg.iterations = iterations
    return cfg


def run_dir(cfg) -> Path:
    return Path(cfg.output_dir) / cfg.name


def train(cfg, executor: str, resume: bool) -> dict:
    """All iterations of one run; returns {"seconds": total, "phases": [{iteration, rollout, teacher, update}]}."""
    from grpo_kd.slurm.plan import prepare_run

    if not resume and run_dir(cfg).exists():
        shutil.rmtree(run_dir(cfg))
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
    return str(model_dir(RunPaths.of(run_dir(cfg)).checkpoint(iteration)))


def with_derived(result: dict) -> dict:
    """The evaluation with the reverse KL per completion (the pooled per-token KL x tokens per completion) as an
    `extra` number: with completions of different lengths, per token and per completion tell different stories."""
    distill = result.get("distill") or {}
    if distill.get("num_samples") and isinstance(distill.get("reverse_kl"), (int, float)):
        per_completion = distill["reverse_kl"] * distill["num_tokens"] / distill["num_samples"]
        result.setdefault("extra", {})["distill"] = {"reverse_kl_per_completion": per_completion}
    return result


def evaluate_into(cfg, model: str, against: str, iteration: int, suites: list[str], shared: dict,
                  base: bool = False) -> None:
    """evaluate_checkpoint of `model` against `against`, saved in the run's reports as `grpo-kd evaluate` saves
    it (`eval_iter_NNNN.json`; `..._vs_base` with `"against": "base"` when scored by the frozen base), where
    `grpo-kd compare` reads it. `shared` keeps iteration 0 per (scorer, seed): every run of a seed starts from the
    same student with the same prompts and sampling seed, so its "before" is computed once and saved into each."""
    from grpo_kd.evaluate.report import save_evaluation
    from grpo_kd.evaluate.suite import evaluate_checkpoint

    key = (against, tuple(suites), cfg.seed)
    if iteration == 0 and key in shared:
        result = copy.deepcopy(shared[key])
    else:
        result = with_derived(evaluate_checkpoint(model, against, suites=suites, cfg=cfg))
        if iteration == 0:
            shared[key] = copy.deepcopy(result)
    result["iteration"] = iteration
    if base:
        result["against"] = "base"
    save_evaluation(result, run_dir(cfg) / "reports", f"iter_{iteration:04d}" + ("_vs_base" if base else ""))


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


def informed_self(cfg, model: str, iteration: int) -> None:
    """The privileged run's target on held-out prompts, saved as the run's evaluation of `iteration` (numbers under
    `extra.informed`): one sample per prompt without the demonstration, and the exact reverse KL per token, on those
    tokens, between the model and itself with the demonstration in its prompt (the informed self,
    `teacher.prompt_template`), and between the model and the initial student with the demonstration (a yardstick
    that does not move with training); also the capital fraction of those samples and of samples drawn with the
    demonstration, and perplexity on the plain FarPaHC dev text."""
    from grpo_kd.data import encode_prompt, load_texts
    from grpo_kd.evaluate.distill import distill_metrics, student_side
    from grpo_kd.evaluate.generation import generate
    from grpo_kd.evaluate.perplexity import perplexity
    from grpo_kd.evaluate.report import save_evaluation
    from grpo_kd.evaluate.suite import checkpoint_tokenizer, heldout_prompts, load_checkpoint

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
        "checkpoint": model, "iteration": iteration, "suites": ["informed", "perplexity"],
        "extra": {"informed": {
            "reverse_kl": to_self["reverse_kl"], "forward_kl": to_self["forward_kl"],
            "reverse_kl_to_initial": to_initial["reverse_kl"],
            "capitals": capital_fraction([s.text for s in samples]),
            "capitals_with_demonstration": capital_fraction([s.text for s in informed_samples]),
            "num_tokens": to_self["num_tokens"]}},
        "perplexity": perplexity(net, tokenizer, texts, batch_size=ev.batch_size),
        "samples": [s.text for s in samples[:5]],
    }
    save_evaluation(result, run_dir(cfg) / "reports", f"iter_{iteration:04d}")


def build_privileged() -> str:
    """The privileged run's own tiny pair (reused when built); returns a line about its student."""
    from grpo_kd.tiny import TEACHER_ARCH, build_tiny_models

    files = privileged_data(PRIVILEGED)
    build_tiny_models(PRIVILEGED / "models", [files["corpus"]], pretrain_steps=0,  # the teacher is unused
                      student_pretrain_steps=PRIVILEGED_STEPS, student_arch=TEACHER_ARCH)
    build = json.loads((PRIVILEGED / "models" / "build.json").read_text())
    return (f"student {build['student']['parameters']:,} parameters ({PRIVILEGED_STEPS} steps, held-out perplexity "
            f"{build['student']['heldout_perplexity']:.1f}), {build['vocab_size']}-token BPE, pre-trained on "
            f"{PRIVILEGED / 'corpus.jsonl'}")


def run_one(exp: Experiment, seed: int, args, teacher: str, shared: dict) -> dict:
    """Train one seed of `exp` and write its evaluations: against the teacher before and after (the privileged run:
    against its informed self every 4 iterations), against the frozen base when that is its target."""
    cfg = load_cfg(exp, args.iterations, seed)
    log.info("== %s: %d iterations", cfg.name, cfg.iterations)
    if args.reuse and (run_dir(cfg) / "reports" / f"eval_iter_{cfg.iterations:04d}.json").is_file():
        return json.loads((run_dir(cfg) / "reports" / "experiment_seconds.json").read_text())
    timing = train(cfg, args.executor, resume=False)
    if exp.target_metric[0] == "informed":
        for i in [0, *range(1, cfg.iterations + 1)]:
            if i % 4 == 0 or i == cfg.iterations:
                informed_self(cfg, checkpoint_model(cfg, i), i)
    else:
        suites = ["perplexity", "distill", "diversity"]
        for i in (0, cfg.iterations):
            evaluate_into(cfg, checkpoint_model(cfg, i), teacher, i, suites, shared)
        if exp.target_metric[0] == "base":
            iterations = range(cfg.iterations + 1) if exp.every_iteration else (0, cfg.iterations)
            for i in iterations:
                evaluate_into(cfg, checkpoint_model(cfg, i), cfg.model.path, i, ["distill", "diversity"], shared,
                              base=True)
    (run_dir(cfg) / "reports" / "experiment_seconds.json").write_text(json.dumps(timing))
    return timing


# ---------------------------------------------------------------------------------------------- output

# What `grpo-kd compare` is asked for: every run against the tiny teacher; the self-distillation runs against their
# frozen base; the privileged runs against their informed self.
TEACHER_METRICS = ["distill/teacher_logprob_mean", "distill/teacher_logprob_per_token", "distill/reverse_kl",
                   "distill/forward_kl", "distill/reverse_kl_per_completion", "distill/top1_agreement",
                   "diversity/distinct_2", "diversity/mean_length_tokens", "perplexity/perplexity"]
BASE_METRICS = ["base:distill/teacher_logprob_mean", "base:distill/reverse_kl", "base:diversity/distinct_1",
                "base:diversity/distinct_2", "base:diversity/distinct_3", "base:diversity/mean_length_tokens"]
INFORMED_METRICS = ["informed/reverse_kl", "informed/forward_kl", "informed/reverse_kl_to_initial",
                    "informed/capitals", "informed/capitals_with_demonstration", "perplexity/perplexity"]
SHORT = {"distill/teacher_logprob_mean": "teacher log-lik. (seq.) ↑", "distill/teacher_logprob_per_token":
         "teacher log-lik. per token ↑", "distill/reverse_kl": "KL(q‖p) ↓", "distill/forward_kl": "KL(p‖q) ↓",
         "distill/reverse_kl_per_completion": "KL(q‖p) per completion ↓", "distill/top1_agreement": "top-1 agree ↑",
         "diversity/distinct_2": "distinct-2 ↑", "diversity/mean_length_tokens": "length (tokens)",
         "perplexity/perplexity": "perplexity ↓", "base:distill/teacher_logprob_mean": "base log-lik. (reward) ↑",
         "base:distill/reverse_kl": "KL(q‖base)", "base:diversity/distinct_1": "distinct-1 ↑",
         "base:diversity/distinct_2": "distinct-2 ↑", "base:diversity/distinct_3": "distinct-3 ↑",
         "base:diversity/mean_length_tokens": "length (tokens)", "informed/reverse_kl": "KL(q‖informed self) ↓",
         "informed/forward_kl": "KL(informed self‖q) ↓", "informed/reverse_kl_to_initial":
         "KL(q‖initial informed self) ↓", "informed/capitals": "capitals in samples",
         "informed/capitals_with_demonstration": "capitals, informed"}


def target_metric(exp: Experiment) -> str:
    against, suite, key = exp.target_metric
    return {"teacher": f"{suite}/{key}", "base": f"base:{suite}/{key}", "informed": f"informed/{key}"}[against]


def comparisons(experiments: list[Experiment], dirs: dict[str, list[str]]) -> dict:
    """`grpo-kd compare`'s Comparison per family of runs (named groups: one per experiment, its seeds inside)."""
    from grpo_kd.evaluate.compare import compare_runs

    families = {"teacher": ([e for e in experiments if e.target_metric[0] != "informed"], TEACHER_METRICS),
                "self_distill": ([e for e in experiments if e.target_metric[0] == "base"], BASE_METRICS),
                "privileged": ([e for e in experiments if e.target_metric[0] == "informed"], INFORMED_METRICS)}
    return {name: compare_runs({e.label: dirs[e.key] for e in chosen}, metrics=metrics, method="t95")
            for name, (chosen, metrics) in families.items() if chosen}


def _pm(s) -> str:
    """A t interval as `mean ± half-width` (n = 1: the value alone)."""
    if s is None:
        return "–"
    if s.n == 1:
        return _fmt(s.mean)
    return f"{_fmt(s.mean)} ± {_fmt((s.high - s.low) / 2)}"


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"


def verdict(comparison, exp: Experiment) -> tuple[str, object, object]:
    """(verdict, first, last) of `exp`'s own target: its last iteration against its iteration 0."""
    metric = target_metric(exp)
    group = next(g for g in comparison.groups if g.label == exp.label)
    its = group.iterations(metric)
    first, last = group.spread(metric, its[0], comparison.method), group.spread(metric, its[-1], comparison.method)
    moved = next(d for d in comparison.differences if d.metric == metric and d.group == exp.label
                 and d.against == f"iteration {its[0]}")
    right_way = moved.delta > 0 if exp.higher_is_better else moved.delta < 0
    if moved.beyond_spread is None:
        text = "one seed: not judged"
    elif not moved.beyond_spread:
        text = "**no**: within the seed spread"
    else:
        text = "yes, beyond the seed spread" if right_way else "**no**: worse, beyond the seed spread"
    return text, first, last


def markdown(summary: dict, experiments: list[Experiment], found: dict) -> str:
    seeds = summary["seeds"]
    lines = [f"# On-policy distillation experiments ({summary['device']})", "",
             f"Command: `{summary['command']}`  ", f"{summary['machine']}  ",
             f"Models: {summary['models']}  ", f"Data: {summary['data']}  ",
             (f"Wall time: {summary['seconds'] / 60:.1f} min; load average before / after: "
              f"{summary['load_before']} / {summary['load_after']}"), "",
             f"Seeds {', '.join(map(str, seeds))} (training and sampling). Each cell: the mean over seeds ± the "
             "half-width of its 95% Student-t interval (mean ± t(0.975, n-1)·sd/√n), from `grpo-kd compare` "
             "(`grpo_kd.evaluate.compare`; its full tables: experiments_*.md beside this file).", "",
             "## Each algorithm's own target, iteration 0 -> last", "",
             "| run | iterations | target | iteration 0 | last | improved | train time s |",
             "|---|---|---|---|---|---|---|"]
    for exp in experiments:
        family = "privileged" if exp.target_metric[0] == "informed" else (
            "self_distill" if exp.target_metric[0] == "base" else "teacher")
        text, first, last = verdict(found[family], exp)
        seconds = [t["seconds"] for t in summary["runs"][exp.key]["train"]]
        lines.append(f"| {exp.label} | {summary['runs'][exp.key]['iterations']} | {exp.target} "
                     f"({'higher' if exp.higher_is_better else 'lower'} is better) | {_pm(first)} | {_pm(last)} | "
                     f"{text} | {sum(seconds) / len(seconds):.0f} |")
    teacher = found.get("teacher")
    if teacher:
        lines += ["", "## Every run against the tiny teacher, on the same held-out prompts (last iteration)", "",
                  "Iteration 0 is the initial student (the same for every run of a seed).", "",
                  "| run | " + " | ".join(SHORT[m] for m in TEACHER_METRICS) + " |",
                  "|---" * (len(TEACHER_METRICS) + 1) + "|"]
        first = teacher.groups[0]
        lines.append("| iteration 0 (initial student) | " + " | ".join(
            _pm(first.spread(m, 0, "t95")) for m in TEACHER_METRICS) + " |")
        for g in teacher.groups:
            lines.append(f"| {g.label} | " + " | ".join(
                _pm(g.spread(m, g.iterations(m)[-1], "t95")) if g.iterations(m) else "–"
                for m in TEACHER_METRICS) + " |")
    for family, title in (("self_distill", "Self-distillation per iteration, against the frozen base (the initial "
                                           "student)"),
                          ("privileged", "The privileged self-teacher against its informed self, on held-out "
                                         "prompts")):
        comparison = found.get(family)
        if not comparison:
            continue
        lines += ["", f"## {title}", "", "| run | iteration | " + " | ".join(SHORT[m] for m in comparison.metrics)
                  + " |", "|---|---" + "|---" * len(comparison.metrics) + "|"]
        for g in comparison.groups:
            for it in g.iterations(comparison.metrics[0]):
                lines.append(f"| {g.label} | {it} | " + " | ".join(_pm(g.spread(m, it, "t95"))
                                                                    for m in comparison.metrics) + " |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--iterations", type=int, default=None, help="override every config's iterations")
    parser.add_argument("--executor", choices=("inproc", "cli"), default="inproc")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose last evaluation is written")
    parser.add_argument("--results", default=None, help="output directory (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)

    if not prepare_process(args.threads):
        return 2
    import torch

    from grpo_kd.evaluate.compare_report import comparison_json, write_comparison
    from grpo_kd.kernels.bench_report import device_slug
    from grpo_kd.tiny import build_tiny_models

    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [e for e in EXPERIMENTS if not args.only or e.key in args.only.split(",")]
    started, load_before = time.monotonic(), os.getloadavg()
    models = build_tiny_models(WORK / "models", CORPUS, pretrain_steps=TEACHER_STEPS,
                               student_pretrain_steps=STUDENT_STEPS)
    build = json.loads((WORK / "models" / "build.json").read_text())
    privileged_models = build_privileged() if any(e.target_metric[0] == "informed" for e in chosen) else None
    teacher, shared = str(ROOT / models.teacher), {}
    runs, dirs = {}, {}
    for exp in chosen:
        timings = []
        for seed in seeds:
            timings.append(run_one(exp, seed, args, teacher, shared))
            dirs.setdefault(exp.key, []).append(str(run_dir(load_cfg(exp, args.iterations, seed))))
        cfg = load_cfg(exp, args.iterations)
        runs[exp.key] = {"label": exp.label, "target": exp.target, "target_metric": target_metric(exp),
                         "iterations": cfg.iterations, "train": timings, "runs": dirs[exp.key],
                         "config": f"configs/experiments/{exp.config or exp.key}.yaml", "overrides": list(exp.overrides)}
    found = comparisons(chosen, dirs)
    device = device_slug("cpu")
    out = Path(args.results) if args.results else ROOT / "benchmarks" / "results" / device
    out.mkdir(parents=True, exist_ok=True)
    for family, comparison in found.items():
        write_comparison(comparison, out, f"experiments_{family}", title=f"Experiments ({family.replace('_', ' ')})")
    cfg0 = load_cfg(EXPERIMENTS[0], args.iterations)
    summary = {
        "device": device, "seeds": seeds,
        "command": " ".join(["python benchmarks/run_experiments.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs (shared), executor "
                   f"{args.executor}",
        "models": f"teacher {build['teacher']['parameters']:,} parameters ({TEACHER_STEPS} steps, held-out perplexity "
                  f"{build['teacher']['heldout_perplexity']:.1f}); student {build['student']['parameters']:,} "
                  f"({STUDENT_STEPS} steps, {build['student']['heldout_perplexity']:.1f}); shared {build['vocab_size']}"
                  "-token byte-level BPE" + (f"; privileged run: {privileged_models}" if privileged_models else ""),
        "data": "prompts: first 4 words of FarPaHC train sentences; held-out prompts and perplexity text: FarPaHC dev "
                f"({cfg0.eval.max_examples} sentences); L_PT text: OFT (from {FAROESE.relative_to(ROOT.parent)})",
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1), "reused_runs": args.reuse,
        "runs": runs, "comparisons": {family: comparison_json(c) for family, c in found.items()},
    }
    text = markdown(summary, chosen, found)
    (out / "experiments.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "experiments.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out / 'experiments.json'}, {out / 'experiments.md'}, {out}/experiments_*.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
