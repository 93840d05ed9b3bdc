"""`grpo-kd demo`: the whole loop on a fresh install, no network, no GPU, in a few minutes on two CPU cores.

    run_demo(Path("runs/demo"))      # tiny models -> prompts -> evaluate -> K iterations -> evaluate -> table + PNG

Steps: build a tiny teacher and student from local text (`grpo_kd.tiny`; the built-in corpus unless `--corpus`),
split the text's lines into training prompts and held-out lines, evaluate the initial student, run the loop with
the local executor (each phase in its own process, exactly as `grpo-kd run` does), evaluate the final student,
and print the algorithm it ran and a before/after table with the path of a PNG of the run:

    teacher log-lik.   mean teacher log-prob per token of the student's samples on held-out prompts  (higher)
    KL to teacher      reverse KL(student || teacher) per token on those samples                      (lower)
    perplexity         the student's perplexity on held-out lines                                     (lower)
    distinct-2         distinct word bigrams of the samples (a guard against collapse)                 (higher)
    length             tokens per sample (a reward that shortens samples past the teacher's own is being gamed)

and beside them the teacher's own numbers (its samples on the same prompts, scored by itself): where the student
should go.

Key design choice: the demo owns no training code. It is a config (`demo_config`) plus the same executor and the
same evaluation as a real run, so what it shows is what the project does. Everything is resumable: a second
`grpo-kd demo` reuses the models, skips finished phases and only evaluates again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from grpo_kd.config import Config, load_config
from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_savefig, atomic_write_json, atomic_write_text
from grpo_kd.paths import RunPaths

HELDOUT_EVERY = 10  # every 10th line of the text is held out (perplexity and evaluation prompts)
PROMPT_WORDS = 4  # a prompt is the first words of a line; the student continues it

# The loop's settings: small enough for two CPU cores, large enough that the student visibly moves. The algorithm
# is the on-policy token-level reverse KL to the teacher (the `privileged` loss with the teacher as its model): of
# every algorithm of the study on the tiny Faroese pair (docs/experiments.md, 3 seeds) it moved the student
# furthest towards the teacher while keeping perplexity and completion length; GRPO with the teacher
# log-likelihood reward, the demo's earlier choice, raises its reward by shortening and narrowing completions.
ALGORITHM = "on-policy token-level reverse KL to the teacher (loss.algorithm: privileged, the teacher's top-128)"
DEMO_OVERRIDES = [
    "rollout.prompts_per_iteration=32", "rollout.group_size=4", "rollout.max_new_tokens=24", "rollout.batch_size=32",
    "teacher.top_k=128", "loss.algorithm=privileged", "loss.teacher_kl.divergence=reverse",
    "loss.teacher_kl.tail=bucket", "optim.lr=1.0e-3", "optim.micro_batch_size=16", "optim.epochs_per_iteration=2",
    "eval.max_examples=200", "eval.max_new_tokens=24", "eval.batch_size=16",
]  # fmt: skip

# (label, suite, key, which direction is better; None: neither, the teacher's value is the target)
ROWS = [
    ("teacher log-lik. per token", "distill", "teacher_logprob_mean", "higher"),
    ("KL(student || teacher)", "distill", "reverse_kl", "lower"),
    ("held-out perplexity", "perplexity", "perplexity", "lower"),
    ("distinct-2", "diversity", "distinct_2", "higher"),
    ("length (tokens)", "diversity", "mean_length_tokens", None),
]
TRAIN_CURVE = ("teacher_kl", "training loss: reverse KL to the teacher per token")  # metrics.jsonl key, title


@dataclass(frozen=True)
class DemoData:
    prompts: Path  # training lines (a prompt is the first PROMPT_WORDS words of each)
    heldout: Path  # held-out lines: perplexity text and evaluation prompts


@dataclass
class DemoResult:
    before: dict
    after: dict
    teacher: dict  # the teacher's own samples, scored by itself: where the student should go
    plot: Path
    seconds: float


def write_demo_data(directory: Path, corpus: list[Path] | None) -> DemoData:
    """Split the distinct corpus lines: every HELDOUT_EVERY-th to the held-out file, the rest to the prompts."""
    from grpo_kd.tiny import corpus_texts

    lines = [" ".join(t.split()) for t in corpus_texts(corpus) if len(t.split()) > PROMPT_WORDS]
    lines = list(dict.fromkeys(lines))  # a repeated line would be held out and trained on at once
    if len(lines) < 2 * HELDOUT_EVERY:
        raise GrpoKdError(f"the corpus has {len(lines)} usable lines; the demo needs at least {2 * HELDOUT_EVERY}")
    data = DemoData(directory / "prompts.txt", directory / "heldout.txt")
    atomic_write_text(data.prompts, "\n".join(l for i, l in enumerate(lines) if i % HELDOUT_EVERY) + "\n")
    atomic_write_text(data.heldout, "\n".join(l for i, l in enumerate(lines) if not i % HELDOUT_EVERY) + "\n")
    return data


def demo_config(out: Path, models, data: DemoData, iterations: int) -> Config:
    """The demo's run config: DEMO_OVERRIDES plus its paths (set directly: a path is not parsed as YAML)."""
    cfg = load_config(None, DEMO_OVERRIDES)
    cfg.name, cfg.output_dir, cfg.iterations = out.name, str(out.parent), iterations
    cfg.model.path, cfg.teacher.path = str(models.student), str(models.teacher)
    cfg.data.prompts, cfg.data.format, cfg.data.prefix_words = str(data.prompts), "text", PROMPT_WORDS
    cfg.data.heldout_fraction, cfg.data.heldout_prompts = 0.0, str(data.heldout)
    cfg.eval.heldout_text, cfg.eval.prompt_words = str(data.heldout), PROMPT_WORDS
    return cfg


def run_demo(
    out: Path, *, corpus: list[Path] | None = None, iterations: int = 3, console: Console | None = None
) -> DemoResult:
    """The whole demo; prints progress and the table on `console`."""
    from grpo_kd.slurm.local import run_local
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.tiny import build_tiny_models
    from grpo_kd.train.checkpoint import model_dir

    console = console or Console(stderr=True)
    started = time.monotonic()
    out = Path(out).expanduser().absolute()
    for file in corpus or []:
        if not Path(file).is_file():
            raise GrpoKdError(f"corpus file not found: {file}")
    with console.status("building the tiny teacher and student (a minute on a laptop CPU)"):
        models = build_tiny_models(out / "models", corpus)
    console.print(f"tiny teacher and student: {out / 'models'}", highlight=False)
    data = write_demo_data(out / "data", corpus)
    cfg, paths = prepare_run(demo_config(out / "run", models, data, iterations))
    teacher = _evaluate(cfg, paths, str(models.teacher), "teacher", console, iteration=None)  # where it should go
    before = _evaluate(cfg, paths, str(models.student), "before", console)
    run_local(cfg, paths, console=console)
    final = model_dir(paths.checkpoint(cfg.iterations))
    after = _evaluate(cfg, paths, str(final), "after", console, iteration=cfg.iterations)
    plot = plot_demo(paths, before, after, teacher)
    seconds = time.monotonic() - started
    console.print(f"algorithm: {ALGORITHM}", highlight=False)
    console.print(before_after_table(before, after, iterations, teacher))
    console.print(f"plot of the run: {plot}\nrun directory: {paths.root}  ({seconds:.0f} s in all)", highlight=False)
    return DemoResult(before, after, teacher, plot, seconds)


def _evaluate(cfg: Config, paths: RunPaths, checkpoint: str, name: str, console: Console,
              iteration: int | None = 0) -> dict:
    """Evaluate once and keep the result in RUN/reports/eval_<name>.json (reused by a second demo)."""
    import json

    from grpo_kd.evaluate.suite import evaluate_checkpoint

    path = paths.reports / f"eval_{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("checkpoint") == checkpoint:
            return saved
    what = f"the {name}" if iteration is None else f"the student {name} training"
    with console.status(f"evaluating {what}"):
        suites = ["perplexity", "distill", "diversity"]
        result = evaluate_checkpoint(checkpoint, cfg.teacher.path, suites=suites, cfg=cfg)
    result.update(name=name, iteration=iteration)
    atomic_write_json(path, result)
    return result


def metric(result: dict, suite: str, key: str) -> float | None:
    value = (result.get(suite) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def before_after_table(before: dict, after: dict, iterations: int, teacher: dict | None = None) -> Table:
    title = f"tiny student, before and after {iterations} iterations (held-out prompts)"
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption="teacher: the teacher's own samples on the same prompts, scored by itself (where the student "
                          "should go)" if teacher else None)
    for name, justify in (("metric", "left"), ("better", "left"), ("before", "right"), ("after", "right"),
                          ("change", "right"), ("teacher", "right")):  # fmt: skip
        table.add_column(name, justify=justify)
    for label, suite, key, better in ROWS:
        b, a = metric(before, suite, key), metric(after, suite, key)
        change = "–"
        if b is not None and a is not None:
            colour = "default" if better is None else "green" if (a > b if better == "higher" else a < b) else "red"
            change = f"[{colour}]{a - b:+.3f}[/]"
        table.add_row(label, better or "–", _fmt(b), _fmt(a), change, _fmt(metric(teacher or {}, suite, key)))
    return table


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot_demo(paths: RunPaths, before: dict, after: dict, teacher: dict | None = None) -> Path:
    """RUN/reports/demo.png: the training loss per optimizer step, and each table metric before and after (the
    teacher's own value as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grpo_kd.evaluate.report import read_metrics

    rows = read_metrics(paths.metrics) if paths.metrics.is_file() else []
    fig, axes = plt.subplots(1, 1 + len(ROWS), figsize=(3.2 * (1 + len(ROWS)), 3.0))
    key, title = TRAIN_CURVE
    steps = [r for r in rows if isinstance(r.get(key), (int, float))]
    axes[0].plot(range(1, len(steps) + 1), [r[key] for r in steps], marker=".")
    axes[0].set_title(title, fontsize=9)
    axes[0].set_xlabel("optimizer step", fontsize=8)
    for ax, (label, suite, key, better) in zip(axes[1:], ROWS):
        values = [metric(before, suite, key), metric(after, suite, key)]
        if None not in values:  # two points, not bars from zero: the change is the point
            ax.plot([0, 1], values, marker="o", color="#2a7ab0")
            for x, value in enumerate(values):
                ax.annotate(f"{value:.3f}", (x, value), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=8)
            target = metric(teacher or {}, suite, key)
            if target is not None:
                ax.axhline(target, color="#888888", linestyle="--", linewidth=1)
                ax.annotate(f"teacher {target:.3f}", (0.5, target), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=7, color="#555555")
            ax.margins(x=0.3, y=0.4)
        ax.set_xticks([0, 1], ["before", "after"])
        ax.set_title(f"{label}\n({better} is better)" if better else f"{label}\n(no better direction)", fontsize=9)
    fig.tight_layout()
    path = atomic_savefig(fig, paths.reports / "demo.png", dpi=110)
    plt.close(fig)
    return path
