"""A teacher with another tokenizer against a same-vocabulary teacher of the same size, on the tiny Faroese
families: the experiment of docs/experiments.md, "A teacher with another tokenizer" (issue 16, item 4).

    python benchmarks/run_xtok.py --seeds 0,1,2                    # the table of docs/experiments.md
    python benchmarks/run_xtok.py --seeds 0 --iterations 2 --only grpo     # a quick look

Models (`grpo_kd.tiny.build_tiny_models`, pre-trained here on FarPaHC train + OFT, ../shared/data/faroese):
- the Mistral family (1,024-token SentencePiece-style BPE with byte fallback, "▁" prefix space): the student, and
  a same-vocabulary teacher of the Gemma-3 teacher's shape (3 layers x 128, 2 heads; Mistral's untied head);
- the Gemma-3 family (2,048-token BPE with byte fallback, no prefix space, the multimodal class): the foreign
  teacher. Its tied embedding of twice the rows holds as many weights as the Mistral teacher's untied pair.
Both tokenizers are trained on the same text, so they differ in vocabulary and in how they split Faroese words.

Runs: every config of ALGORITHMS (configs/experiments/<key>.yaml) x both teachers x `--seeds`, each for its
config's iterations (16) unless `--iterations`; nothing but the teacher's path differs between the two teachers'
runs (`eval.distill_cross_tokenizer` is set for both; `--set` overrides apply to every run). Each run's student is evaluated before (iteration 0) and after (`grpo_kd.evaluate.suite`, the
function `grpo-kd evaluate` calls; saved in RUN/reports as `grpo-kd evaluate` saves them) on the FarPaHC dev
prompts (never trained on) against its own teacher: the teacher's NLL per UTF-8 byte of the student's samples
(comparable across tokenizers) and the perplexity of the FarPaHC dev text. `grpo_kd.evaluate.compare` (what
`grpo-kd compare` runs) then gives each group's mean and min-max range over seeds, written to
benchmarks/results/<device>/xtok.{md,json,png} (every iteration), xtok_before_after.md (first and last iteration)
and xtok_run.json (timings, models, `cache stats` of the first foreign-teacher run). `--reuse` keeps the runs whose
last evaluation is written (to redo only the tables).

Key design choice: the initial evaluation of one (teacher, seed) is computed once and saved into every run that
starts from it (the same model, teacher, prompts and sampling seed give the same numbers), so the grid pays for
one "before" per teacher and seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_experiments import CORPUS, checkpoint_model, evaluate_into, prepare_process, train

WORK = Path("runs/xtok")  # relative to ROOT
TEACHER_STEPS, STUDENT_STEPS = 300, 100
VOCAB = {"mistral": 1024, "gemma3": 2048}
ALGORITHMS = {  # config key -> label
    "grpo": "GRPO, teacher log-lik. reward",
    "grpo_minillm_reward": "GRPO, MiniLLM-style reward + L_PT",
    "ppo": "PPO, teacher log-lik. reward (at the last token)",
    "ppo_minillm_reward": "PPO, MiniLLM-style per-token reward + L_PT",
}
TEACHERS = {"foreign": "Gemma-3 teacher (another tokenizer)", "same": "Mistral teacher (the student's tokenizer)"}
METRICS = ["distill/teacher_nll_per_byte", "perplexity/perplexity", "perplexity/bits_per_byte",
           "diversity/distinct_2", "diversity/mean_length_words", "distill/reverse_kl",  # KL: one vocabulary only
           "train/reward/teacher_loglik", "train/reward/log_ratio"]  # per student token, on the iteration's samples
SUITES = ["perplexity", "distill", "diversity"]

log = logging.getLogger("run_xtok")


def build_models() -> dict[str, Path]:
    """The student, the same-vocabulary teacher and the foreign teacher (reused when already built)."""
    from grpo_kd.tiny import build_tiny_models
    from grpo_kd.tiny_families import family

    shape = replace(family("gemma3").teacher_arch, tie_embeddings=False)  # Mistral's untied head
    mistral = build_tiny_models(WORK / "models-mistral", CORPUS, arch="mistral", vocab_size=VOCAB["mistral"],
                                pretrain_steps=TEACHER_STEPS, student_pretrain_steps=STUDENT_STEPS, teacher_arch=shape)
    gemma = build_tiny_models(WORK / "models-gemma3", CORPUS, arch="gemma3", vocab_size=VOCAB["gemma3"],
                              pretrain_steps=TEACHER_STEPS, student_pretrain_steps=0)  # its student is unused
    return {"student": mistral.student, "same": mistral.teacher, "foreign": gemma.teacher}


def model_facts() -> dict:
    out = {}
    for name, directory, role in (("student", "models-mistral", "student"), ("same", "models-mistral", "teacher"),
                                  ("foreign", "models-gemma3", "teacher")):
        build = json.loads((WORK / directory / "build.json").read_text(encoding="utf-8"))
        out[name] = {"parameters": build[role]["parameters"], "pretrain_steps": build[role]["pretrain_steps"],
                     "heldout_perplexity": build[role]["heldout_perplexity"], "vocab_size": build["vocab_size"]}
    return out


def run_config(algorithm: str, teacher: str, seed: int, models: dict, args):
    from grpo_kd.config import load_config

    name = f"{algorithm}{args.tag}-{teacher}-s{seed}"
    return load_config(ROOT / "configs" / "experiments" / f"{algorithm}.yaml", [
        f"name={name}", f"output_dir={WORK}", f"seed={seed}", f"model.path={models['student']}",
        f"teacher.path={models[teacher]}", "eval.distill_cross_tokenizer=true",
        *([f"iterations={args.iterations}"] if args.iterations else []), *args.set])


def trained(cfg) -> bool:
    """The run's last evaluation is written (`--reuse` keeps such a run as it is)."""
    return (Path(cfg.output_dir) / cfg.name / "reports" / f"eval_iter_{cfg.iterations:04d}.json").is_file()


def before_after(comparison) -> str:
    """Per metric and group: the first and the last iteration with a value, mean [min, max] over seeds."""
    from grpo_kd.evaluate.compare_report import _cell

    lines = ["| metric | group | first it. | value | last it. | value |", "|---|---|---|---|---|---|"]
    for metric in comparison.metrics:
        for group in comparison.groups:
            its = group.iterations(metric)
            if its:
                first, last = its[0], its[-1]
                cells = [_cell(group.spread(metric, it, comparison.method)) for it in (first, last)]
                lines.append(f"| {metric} | {group.label} | {first} | {cells[0]} | {last} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def cache_stats_line(run_dir: Path) -> list[str]:
    from grpo_kd.cache.stats import run_stats

    return [line for _, _, line in run_stats(run_dir, iteration=1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds (default 0,1)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per run (default: the configs')")
    parser.add_argument("--only", default="", help="comma-separated algorithms (default: all of ALGORITHMS)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose last evaluation is written")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override for every run (repeatable), e.g. optim.lr=5e-4; use with --tag")
    parser.add_argument("--tag", default="", help="suffix of the run names and the result files, e.g. _lr5e-4")
    parser.add_argument("--results", default=None, help="output directory (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)

    if not prepare_process(args.threads):
        return 2
    import torch

    from grpo_kd.evaluate.compare import compare_runs
    from grpo_kd.evaluate.compare_report import write_comparison
    from grpo_kd.kernels.bench_report import device_slug

    seeds = [int(s) for s in args.seeds.split(",")]
    algorithms = [a for a in ALGORITHMS if not args.only or a in args.only.split(",")]
    started, load_before = time.monotonic(), os.getloadavg()
    models = {k: str(ROOT / v) for k, v in build_models().items()}
    log.info("models built in %.0f s", time.monotonic() - started)
    shared: dict = {}  # iteration 0 per (teacher, seed): evaluate_into computes it once
    groups: dict[str, list[str]] = {}
    seconds: dict[str, dict] = {}
    for algorithm in algorithms:
        for teacher, teacher_label in TEACHERS.items():
            for seed in seeds:
                cfg = run_config(algorithm, teacher, seed, models, args)
                t0 = time.monotonic()
                if not (args.reuse and trained(cfg)):
                    timing = train(cfg, "inproc", resume=False)  # a fresh run directory: evaluations after it
                    evaluate_into(cfg, models["student"], models[teacher], 0, SUITES, shared)
                    evaluate_into(cfg, checkpoint_model(cfg, cfg.iterations), models[teacher], cfg.iterations, SUITES,
                                  shared)
                    took = {"train": timing["seconds"], "with_evaluations": round(time.monotonic() - t0, 1)}
                    (Path(cfg.output_dir) / cfg.name / "reports" / "xtok_seconds.json").write_text(json.dumps(took))
                    log.info("%s: trained in %.0f s, %.0f s with its evaluations", cfg.name, took["train"],
                             took["with_evaluations"])
                seconds[cfg.name] = json.loads(
                    (Path(cfg.output_dir) / cfg.name / "reports" / "xtok_seconds.json").read_text())
                groups.setdefault(f"{ALGORITHMS[algorithm]}; {teacher_label}", []).append(
                    str(Path(cfg.output_dir) / cfg.name))
    comparison = compare_runs(groups, metrics=METRICS, method="minmax")
    out = Path(args.results) if args.results else ROOT / "benchmarks" / "results" / device_slug("cpu")
    paths = write_comparison(comparison, out, f"xtok{args.tag}")
    table = before_after(comparison)
    (out / f"xtok{args.tag}_before_after.md").write_text(table, encoding="utf-8")
    first_foreign = next(d for label, dirs in groups.items() if TEACHERS["foreign"] in label for d in dirs)
    stats = cache_stats_line(Path(first_foreign))
    command = " ".join(["python benchmarks/run_xtok.py", *(argv if argv is not None else sys.argv[1:])])
    facts = {"command": command, "overrides": args.set, "seconds": round(time.monotonic() - started, 1),
             "run_seconds": seconds, "reused_runs": args.reuse,
             "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
             "machine": f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs (shared)",
             "models": model_facts(), "cache_stats_iteration_1": {first_foreign: stats}}
    (out / f"xtok{args.tag}_run.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(json.dumps(facts, indent=2))
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), out / f"xtok{args.tag}_before_after.md",
                                                          out / f"xtok{args.tag}_run.json"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
