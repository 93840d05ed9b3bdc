"""Reports: one evaluation as JSON + markdown + PNG, and a whole run as learning curves and a table.

    save_evaluation(result, "runs/x/reports", "iter_0002")  # eval_iter_0002.{json,md,png}
    run_report("runs/x")                                    # report.md, learning_curves.png, evaluations.png

Key design choice: the report reads only files (`logs/metrics.jsonl`, `reports/eval_*.json`), so it can be made
at any time, while a run is going, on any machine, and plots whatever numeric keys are there instead of a fixed
list (a new reward component shows up without a code change). Matplotlib runs headless (Agg). A step whose loss
or gradient norm was NaN or inf (`"skipped": 1` in metrics.jsonl, or a non-finite loss) is counted and named
in the report's headline, and a table's "last" is the last step's value even when it is NaN: a report never shows
a stale finite "last loss" for a run that ended on NaN.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grpo_kd.errors import GrpoKdError  # noqa: E402
from grpo_kd.fsutil import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402

# The numbers a table shows per suite, in order (any other numeric key is in the JSON).
HEADLINE = {
    "foqa": ["em", "f1"],
    "perplexity": ["perplexity", "bits_per_byte"],
    "distill": ["teacher_logprob_mean", "forward_kl", "reverse_kl", "top1_agreement"],
    "diversity": ["distinct_1", "distinct_2", "distinct_3", "repetition_rate", "mean_length_words"],
}
_X_KEYS = ("step", "iteration", "epoch", "time", "timestamp")
_NOT_CURVES = ("skipped",)  # numeric keys of metrics.jsonl that are flags, not curves


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def headline_metrics(result: dict) -> dict[str, float]:
    """`{"suite/metric": value}` of the headline numbers of one evaluation, EuroEval's included."""
    flat: dict[str, float] = {}
    for suite, keys in HEADLINE.items():
        for key in keys:
            value = _number((result.get(suite) or {}).get(key))
            if value is not None:
                flat[f"{suite}/{key}"] = value
    for dataset, metrics in ((result.get("euroeval") or {}).get("datasets") or {}).items():
        for key, value in metrics.items():
            if _number(value) is not None and not key.endswith("_se"):
                flat[f"euroeval/{dataset}/{key}"] = float(value)
    return flat


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


# ---------------------------------------------------------------------------------------------- one evaluation


def evaluation_markdown(result: dict, image: str | None = None) -> str:
    lines = [f"# Evaluation of `{result.get('checkpoint')}`", ""]
    if result.get("teacher"):
        lines += [f"Teacher: `{result['teacher']}`", ""]
    lines += [f"Suites: {', '.join(result.get('suites', []))}; {result.get('created', '')}", ""]
    for warning in result.get("warnings", []):
        lines.append(f"> **warning:** {warning}")
    if result.get("warnings"):
        lines.append("")
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in headline_metrics(result).items()]
    if result.get("distill", {}).get("kl_method"):
        lines += ["", f"KL: {result['distill']['kl_method']}."]
    examples = (result.get("foqa") or {}).get("examples") or []
    if examples:
        lines += ["", "## FoQA predictions (first ones)", "", "| question | gold | prediction | F1 |", "|---|---|---|---|"]
        for e in examples[:10]:
            cells = [e["question"], " / ".join(e["answers"]), e["prediction"]]
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
            lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | {e['f1']:.2f} |")
    if image:
        lines += ["", f"![evaluation]({image})"]
    return "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> None:
    atomic_savefig(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_evaluation(result: dict, path: str | Path) -> None:
    """One panel per suite: its headline numbers as labelled horizontal bars (scales differ between suites)."""
    flat = headline_metrics(result)
    suites = list(dict.fromkeys(key.split("/")[0] for key in flat)) or ["(none)"]
    fig, axes = plt.subplots(1, len(suites), figsize=(3.8 * len(suites), 2.8), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        items = [(k.split("/", 1)[1], v) for k, v in flat.items() if k.startswith(suite + "/")]
        positions = range(len(items))
        ax.barh(positions, [v for _, v in items], color="tab:blue")
        ax.set_yticks(positions, [k for k, _ in items], fontsize=8)
        ax.invert_yaxis()
        for y, (_, value) in zip(positions, items):
            ax.annotate(_fmt(value), (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.margins(x=0.25)
        ax.set_title(suite, fontsize=10)
    fig.suptitle(Path(str(result.get("checkpoint", ""))).name, fontsize=10)
    fig.tight_layout()
    _savefig(fig, Path(path))


def save_evaluation(result: dict, reports_dir: str | Path, name: str) -> dict[str, Path]:
    """Write `eval_<name>.json`, `.md` and `.png` under `reports_dir` (atomically); return their paths."""
    reports = Path(reports_dir)
    paths = {suffix: reports / f"eval_{name}.{suffix}" for suffix in ("json", "md", "png")}
    atomic_write_json(paths["json"], {"name": name, **result})
    plot_evaluation(result, paths["png"])
    atomic_write_text(paths["md"], evaluation_markdown(result, paths["png"].name))
    return paths


# ---------------------------------------------------------------------------------------------- a run


def _flatten(row: dict, prefix: str = "") -> dict:
    """{"reward": {"teacher_loglik": 1}} -> {"reward/teacher_loglik": 1}."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, nested keys joined with "/"; lines that are not JSON objects (a write cut
    short) are skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(_flatten(row))
    return rows


def read_evaluations(reports_dir: str | Path) -> list[dict]:
    """Every `eval_*.json` of a run, ordered by iteration (evaluations without one first), then name."""
    evaluations = []
    for path in sorted(Path(reports_dir).glob("eval_*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            data.setdefault("name", path.stem[len("eval_"):])
            evaluations.append(data)
    return sorted(evaluations, key=lambda e: (e.get("iteration") is not None, e.get("iteration") or 0, e["name"]))


def _x_axis(rows: list[dict]) -> tuple[str, list[float]]:
    for key in _X_KEYS[:2]:
        if all(_number(r.get(key)) is not None for r in rows):
            return key, [float(r[key]) for r in rows]
    return "row", [float(i) for i in range(len(rows))]


def curve_keys(rows: list[dict]) -> list[str]:
    """Numeric keys of the metrics rows, other than the x axes, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in _X_KEYS and key not in _NOT_CURVES and _number(value) is not None:
                keys.setdefault(key)
    return list(keys)


def plot_curves(rows: list[dict], path: str | Path) -> list[str]:
    """One small panel per numeric key against the step; returns the keys plotted."""
    keys = curve_keys(rows)
    if not keys:
        return []
    x_name, x = _x_axis(rows)
    columns = min(3, len(keys))
    rows_n = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 2.8 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(xi, _number(r.get(key))) for xi, r in zip(x, rows) if _number(r.get(key)) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x_name, fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    _savefig(fig, Path(path))
    return keys


def plot_evaluations(evaluations: list[dict], path: str | Path) -> list[str]:
    """One panel per headline metric, the evaluations side by side in iteration order."""
    tables = [headline_metrics(e) for e in evaluations]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    if not keys:
        return []
    labels = [e["name"] for e in evaluations]
    columns = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / columns), columns, figsize=(4.2 * columns, 3.0 * math.ceil(len(keys) / columns)), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        values = [t.get(key, math.nan) for t in tables]
        ax.plot(range(len(values)), values, marker="o")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    _savefig(fig, Path(path))
    return keys


def _any_number(value) -> float | None:
    """A metric as a float, NaN and inf included (metrics.jsonl writes them as the strings "nan", "inf")."""
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def nonfinite_steps(rows: list[dict]) -> list[dict]:
    """The steps that were skipped or whose loss is NaN or inf."""
    bad = []
    for row in rows:
        loss = _any_number(row.get("loss"))
        if row.get("skipped") or (loss is not None and not math.isfinite(loss)):
            bad.append(row)
    return bad


def curves_headline(rows: list[dict]) -> str:
    """`32 steps, last loss nan; 31 non-finite steps (first: iteration 1 step 2: ...)` for the report and the CLI."""
    losses = [v for v in (_any_number(r.get("loss")) for r in rows) if v is not None]
    last = f", last loss {_fmt_any(losses[-1])}" if losses else ""
    bad = nonfinite_steps(rows)
    if not bad:
        return f"{len(rows)} steps{last}; no non-finite step"
    first = bad[0]
    why = f": {first['nonfinite']}" if isinstance(first.get("nonfinite"), str) else ""
    return (f"{len(rows)} steps{last}; {len(bad)} non-finite step(s), their updates skipped or the update stopped "
            f"(first: iteration {first.get('iteration')} step {first.get('step')}{why})")


def _fmt_any(value: float | None) -> str:
    return _fmt(value) if value is None or math.isfinite(value) else str(value)


def _curves_summary(rows: list[dict], keys: list[str]) -> list[str]:
    """first / last (NaN shown as NaN) and min / max (of the finite values) of each curve."""
    lines = ["| metric | first | last | min | max |", "|---|---|---|---|---|"]
    for key in keys:
        values = [v for v in (_any_number(r.get(key)) for r in rows) if v is not None]
        finite = [v for v in values if math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (None, None)
        lines.append(f"| {key} | {_fmt_any(values[0])} | {_fmt_any(values[-1])} | {_fmt(low)} | {_fmt(high)} |")
    return lines


def _evaluations_table(evaluations: list[dict]) -> list[str]:
    tables = [headline_metrics(e) for e in evaluations]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    lines = ["| evaluation | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for evaluation, table in zip(evaluations, tables):
        lines.append(f"| {evaluation['name']} | " + " | ".join(_fmt(table.get(k)) for k in keys) + " |")
    warnings = [f"- {e['name']}: {w}" for e in evaluations for w in e.get("warnings", [])]
    return lines + (["", "Warnings:", *warnings] if warnings else [])


def run_report(run_dir: str | Path) -> dict[str, Path]:
    """Learning curves and evaluations of a run under RUN/reports/; an error when there is nothing to report."""
    from grpo_kd.paths import RunPaths

    run = RunPaths.of(run_dir)
    if not run.root.is_dir():
        raise GrpoKdError(f"run directory not found: {run.root}")
    rows = read_metrics(run.metrics) if run.metrics.is_file() else []
    evaluations = read_evaluations(run.reports) if run.reports.is_dir() else []
    if not rows and not evaluations:
        raise GrpoKdError(f"{run.root} has nothing to report: no rows in {run.metrics} and no {run.reports}/eval_*.json")
    written: dict[str, Path] = {}
    lines = [f"# Report of run `{run.root.name}`", ""]
    if rows:
        keys = plot_curves(rows, run.reports / "learning_curves.png")
        if keys:
            written["curves"] = run.reports / "learning_curves.png"
            lines += [f"## Learning curves ({len(rows)} steps)", "", f"**{curves_headline(rows)}**", "",
                      "![learning curves](learning_curves.png)", ""]
            lines += _curves_summary(rows, keys) + [""]
    if evaluations:
        lines += ["## Evaluations", ""] + _evaluations_table(evaluations) + [""]
        if plot_evaluations(evaluations, run.reports / "evaluations.png"):
            written["evaluations"] = run.reports / "evaluations.png"
            lines += ["![evaluations](evaluations.png)", ""]
    written["markdown"] = run.reports / "report.md"
    atomic_write_text(written["markdown"], "\n".join(lines))
    return written


def report_name(checkpoint: str | Path, iteration: int | None) -> str:
    """`iter_0002` for a run's checkpoint, else the checkpoint directory's name made file-safe."""
    if iteration is not None:
        return f"iter_{iteration:04d}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(checkpoint)).name) or "model"
