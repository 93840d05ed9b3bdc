"""Runs side by side: the chosen metrics per iteration with their spread over seeds, the best checkpoint of each
run, and which differences are larger than the seed spread (`grpo-kd compare RUN...`).

    comparison = compare_runs(["runs/grpo_s0", "runs/grpo_s1", "runs/ppo_s0", "runs/ppo_s1"])
    comparison = compare_runs({"GRPO": grpo_dirs, "PPO": ppo_dirs}, metrics=["distill/reverse_kl"])
    write_comparison(comparison, "docs/results", "tiny")    # tiny.md, tiny.json, tiny.png (compare_report.py)

Inputs are files only: each run's `config.yaml`, `logs/metrics.jsonl` (a training metric `train/<key>` is the mean
of the key over the iteration's optimizer steps) and `reports/eval_*.json` (an evaluation metric is
`<suite>/<key>` of `headline_metrics`, at the evaluation's iteration; iteration 0 is the initial model). An
evaluation scored against another model than the run's teacher says so with `"against": "base"` in its JSON, and
its metrics are `base:<suite>/<key>`, beside the teacher's.

Key design choices: runs that differ only in their seed form a group (their resolved configs are equal once
`name`, `output_dir`, `seed`, `iterations` and the `slurm`, `tracking` and `checkpoint` sections are set aside),
unless the caller names the groups; a group's number at an iteration is the mean over its runs with a 95% t
interval, or the min-max range (`spread.py`); a difference counts as larger than the seed spread when the two
intervals do not overlap, and is not judged when either side has a single run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from grpo_kd.errors import GrpoKdError
from grpo_kd.evaluate.report import headline_metrics, read_evaluations, read_metrics
from grpo_kd.evaluate.spread import METHODS, Method, Spread, overlap, spread
from grpo_kd.paths import RunPaths

# Settings that do not change what a run computes: runs that differ only in these (and the seed) form a group.
NOT_SETUP = ("name", "output_dir", "seed", "iterations")
NOT_SETUP_SECTIONS = ("slurm.", "tracking.", "checkpoint.")
# Which way is better, for choosing a best checkpoint and reading a difference (None: neither).
BETTER: dict[str, str | None] = {
    "foqa/em": "max", "foqa/f1": "max", "perplexity/perplexity": "min", "perplexity/bits_per_byte": "min",
    "distill/teacher_logprob_mean": "max", "distill/teacher_nll_per_byte": "min",
    "distill/forward_kl": "min", "distill/reverse_kl": "min",
    "distill/top1_agreement": "max", "diversity/distinct_1": "max", "diversity/distinct_2": "max",
    "diversity/distinct_3": "max", "diversity/repetition_rate": "min", "diversity/mean_length_words": None,
    "train/reward/total": "max", "train/loss": "min", "distill/teacher_logprob_per_token": "max",
    "diversity/mean_length_tokens": None, "informed/reverse_kl": "min", "informed/reverse_kl_to_initial": "min",
}


def better(metric: str) -> str | None:
    """"max", "min" or None for `metric`; `base:distill/reverse_kl` reads as `distill/reverse_kl`."""
    return BETTER.get(metric.rpartition(":")[2])


_SEED_SUFFIX = re.compile(r"[-_.]?(?:seed|s)[-_]?\d+$")


@dataclass
class RunData:
    """One run's numbers per iteration, read from its files."""

    path: Path
    name: str
    seed: int | None
    setup: dict[str, object]  # flattened config without NOT_SETUP keys
    series: dict[str, dict[int, float]]  # metric -> {iteration: value}
    model_path: str | None = None  # the initial model (iteration 0)

    def checkpoint(self, iteration: int) -> str | None:
        """The model of `iteration`: the initial model for 0, else RUN/checkpoints/iter_NNNN."""
        return self.model_path if iteration == 0 else str(RunPaths.of(self.path).checkpoint(iteration))


@dataclass
class Group:
    label: str
    runs: list[RunData]
    settings: dict[str, object] = field(default_factory=dict)  # the settings that set it apart from other groups

    def spread(self, metric: str, iteration: int, method: Method) -> Spread | None:
        values = [r.series[metric][iteration] for r in self.runs if iteration in r.series.get(metric, {})]
        return spread(values, method) if values else None

    def iterations(self, metric: str) -> list[int]:
        return sorted({it for r in self.runs for it in r.series.get(metric, {})})


@dataclass(frozen=True)
class Best:
    run: str
    group: str
    seed: int | None
    metric: str
    direction: str
    iteration: int
    value: float
    checkpoint: str | None


@dataclass(frozen=True)
class Difference:
    metric: str
    group: str
    against: str  # another group's label, or "iteration N" of the same group
    iteration: int  # the iteration compared (the group's last with a value of the metric)
    delta: float  # mean(group) - mean(against)
    this: Spread
    other: Spread
    beyond_spread: bool | None  # None: a side with one run, no spread to compare with


@dataclass
class Comparison:
    groups: list[Group]
    metrics: list[str]
    method: Method
    best_metric: str | None
    best: list[Best]
    differences: list[Difference]
    baseline: str | None


# ---------------------------------------------------------------------------------------------- reading runs


def _flatten(data: Mapping, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return flat


def _read_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GrpoKdError(f"{path}: not a readable config: {exc}") from None
    return data if isinstance(data, dict) else {}


def train_series(rows: list[dict]) -> dict[str, dict[int, float]]:
    """`train/<key>` -> {iteration: mean of the key over the iteration's optimizer steps}."""
    sums: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        iteration = row.get("iteration")
        if not isinstance(iteration, int):
            continue
        for key, value in row.items():
            if key in ("iteration", "step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                sums.setdefault(f"train/{key}", {}).setdefault(iteration, []).append(float(value))
    return {key: {it: sum(v) / len(v) for it, v in sorted(per.items())} for key, per in sums.items()}


def load_run(path: str | Path) -> RunData:
    """A run's numbers: its training metrics and evaluations per iteration; an error for a run with neither."""
    run = RunPaths.of(Path(path))
    if not run.root.is_dir():
        raise GrpoKdError(f"run directory not found: {run.root}")
    config = _read_config(run.config) if run.config.is_file() else {}
    series = train_series(read_metrics(run.metrics)) if run.metrics.is_file() else {}
    for evaluation in read_evaluations(run.reports) if run.reports.is_dir() else []:
        if isinstance(evaluation.get("iteration"), int):
            against = f"{evaluation['against']}:" if isinstance(evaluation.get("against"), str) else ""
            for key, value in headline_metrics(evaluation).items():
                series.setdefault(against + key, {})[evaluation["iteration"]] = value
    if not series:
        raise GrpoKdError(f"{run.root} has nothing to compare: no rows in {run.metrics} and no evaluation with an "
                          f"iteration in {run.reports}/eval_*.json")
    flat = _flatten(config)
    setup = {k: v for k, v in flat.items() if k not in NOT_SETUP and not k.startswith(NOT_SETUP_SECTIONS)}
    if not config:
        setup = {"(no config.yaml)": str(run.root.resolve())}  # nothing says it is a seed of another run
    seed = config.get("seed") if isinstance(config.get("seed"), int) else None
    model = (config.get("model") or {}).get("path") if isinstance(config.get("model"), dict) else None
    return RunData(run.root, run.root.name, seed, setup, series, model)


def group_runs(runs: Sequence[RunData]) -> list[Group]:
    """Runs with equal setups, in the order their first run was given; labels from the run names without their
    seed suffix when that tells the groups apart, else from the settings that differ."""
    by_setup: dict[str, list[RunData]] = {}
    for run in runs:
        by_setup.setdefault(json.dumps(run.setup, sort_keys=True, default=str), []).append(run)
    groups = [Group("", members) for members in by_setup.values()]
    _describe(groups)
    stems = [{_SEED_SUFFIX.sub("", r.name) for r in g.runs} for g in groups]
    if all(len(s) == 1 for s in stems) and len({next(iter(s)) for s in stems}) == len(groups):
        for group, stem in zip(groups, stems):
            group.label = next(iter(stem))
    else:
        for group in groups:
            text = " ".join(f"{k}={v}" for k, v in group.settings.items())
            group.label = text if text and len(text) <= 60 else group.runs[0].name
    return groups


def _describe(groups: list[Group]) -> None:
    """Each group's settings that differ between groups."""
    keys = sorted({k for g in groups for k in g.runs[0].setup})
    differing = [k for k in keys if len({json.dumps(g.runs[0].setup.get(k), default=str) for g in groups}) > 1]
    for group in groups:
        group.settings = {k: group.runs[0].setup.get(k) for k in differing}


# ---------------------------------------------------------------------------------------------- comparing


def default_metrics(groups: list[Group]) -> list[str]:
    """Every evaluation headline metric found, then the training reward; without either, the first six training
    metrics."""
    found = list(dict.fromkeys(k for g in groups for r in g.runs for k in r.series))
    evaluation = [k for k in found if not k.startswith("train/")]
    return evaluation + [k for k in ("train/reward/total",) if k in found] or found[:6]


def parse_best(best: str | None, metrics: list[str]) -> tuple[str | None, str | None]:
    """`metric`, `metric:max` or `metric:min` -> (metric, direction); default: the first metric with a known
    direction."""
    if best is None:
        metric = next((m for m in metrics if better(m)), None)
        return metric, better(metric) if metric else None
    metric, _, direction = best.partition(":")
    direction = direction or better(metric) or ""
    if direction not in ("max", "min"):
        raise GrpoKdError(f"--best {best}: say which way is better, as {metric}:max or {metric}:min")
    return metric, direction


def best_checkpoints(groups: list[Group], metric: str, direction: str) -> list[Best]:
    """The iteration of each run where `metric` is best, and its checkpoint."""
    out = []
    for group in groups:
        for run in group.runs:
            values = run.series.get(metric, {})
            if not values:
                continue
            sign = -1 if direction == "max" else 1
            pick = min(values, key=lambda it: (sign * values[it], it))  # a tie goes to the earlier iteration
            out.append(Best(run.name, group.label, run.seed, metric, direction, pick, values[pick], run.checkpoint(pick)))
    return out


def differences(groups: list[Group], metrics: list[str], method: Method, baseline: Group | None) -> list[Difference]:
    """Per metric, at each group's last iteration with a value: the group against the baseline group, and against
    its own first iteration (did it move beyond its seed spread?)."""
    out = []
    for metric in metrics:
        for group in groups:
            iterations = group.iterations(metric)
            if not iterations:
                continue
            last = iterations[-1]
            this = group.spread(metric, last, method)
            if len(iterations) > 1:
                first = group.spread(metric, iterations[0], method)
                out.append(_difference(metric, group.label, f"iteration {iterations[0]}", last, this, first))
            if baseline is not None and group is not baseline and baseline.iterations(metric):
                other = baseline.spread(metric, baseline.iterations(metric)[-1], method)
                out.append(_difference(metric, group.label, baseline.label, last, this, other))
    return out


def _difference(metric, group, against, iteration, this: Spread, other: Spread) -> Difference:
    separated = overlap(this, other)
    return Difference(metric, group, against, iteration, this.mean - other.mean, this, other,
                      None if separated is None else not separated)


def compare_runs(runs: Sequence[str | Path] | Mapping[str, Sequence[str | Path]], *, metrics: Sequence[str] | None = None,
                 method: Method = "t95", best: str | None = None, baseline: str | None = None) -> Comparison:
    """Compare run directories: a list (grouped by setup, see the module doc) or {label: run directories}.

    `metrics`: names as in the output (`distill/reverse_kl`, `train/reward/total`; default: every evaluation
    headline metric and the training reward); `best`: the metric that picks each run's best checkpoint
    (`metric[:max|min]`); `baseline`: the label of the group every other is compared with (default: the first)."""
    if method not in METHODS:
        raise GrpoKdError(f"unknown interval {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(runs, Mapping):
        empty = [label for label, paths in runs.items() if not paths]
        if empty:
            raise GrpoKdError(f"group {empty[0]!r} has no run directory")
        groups = [Group(label, [load_run(p) for p in paths]) for label, paths in runs.items()]
        _describe(groups)
    else:
        groups = group_runs([load_run(p) for p in runs])
    if not groups or not any(g.runs for g in groups):
        raise GrpoKdError("compare needs at least one run directory")
    available = sorted({k for g in groups for r in g.runs for k in r.series})
    chosen = list(metrics) if metrics else default_metrics(groups)
    missing = [m for m in chosen if m not in available]
    if missing:
        raise GrpoKdError(f"metric {missing[0]!r} is in none of the runs; they have: {', '.join(available)}")
    best_metric, direction = parse_best(best, chosen)
    if best_metric is not None and best_metric not in available:
        raise GrpoKdError(f"--best {best_metric!r} is in none of the runs; they have: {', '.join(available)}")
    labels = [g.label for g in groups]
    if baseline is not None and baseline not in labels:
        raise GrpoKdError(f"baseline {baseline!r} is not a group; the groups are: {', '.join(labels)}")
    base = groups[labels.index(baseline)] if baseline is not None else (groups[0] if len(groups) > 1 else None)
    picked = best_checkpoints(groups, best_metric, direction) if best_metric else []
    return Comparison(groups, chosen, method, best_metric, picked, differences(groups, chosen, method, base),
                      base.label if base else None)
