"""Reports: one evaluation as JSON + markdown + PNG, and a whole run as learning curves and a table.

    save_evaluation(result, "runs/x/reports", "iter_0002")  # eval_iter_0002.{json,md,png}
    run_report("runs/x")                                    # report.md, learning_curves.png, evaluations.png

Key design choice: the report reads only files (`logs/metrics.jsonl`, `reports/eval_*.json`), so it can be made
at any time, while a run is going, on any machine, and plots whatever numeric keys are there instead of a fixed
list (a new reward component shows up without a code change). Learning curves are drawn against the run's one
step axis (the global optimizer step of grpo_kd/train/metrics.py: the steps of earlier iterations plus the step),
with the iteration boundaries marked and a moving average over the raw points; evaluations are lines over
iterations. Matplotlib runs headless (Agg) and is imported only to draw.
A step whose loss or gradient norm was NaN or inf (`"skipped": 1` in metrics.jsonl, or a non-finite loss) is
counted and named in the report's headline, and a table's "last" is the last step's value even when it is NaN: a
report never shows a stale finite "last loss" for a run that ended on NaN.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_savefig, atomic_write_json, atomic_write_text, remove_path
from grpo_kd.train.metrics import POSITION_KEYS, iteration_offsets, offset_of

# The numbers a table shows per suite, in order (any other numeric key is in the JSON).
HEADLINE = {
    "foqa": ["em", "f1"],
    "perplexity": ["perplexity", "bits_per_byte"],
    "distill": ["teacher_logprob_mean", "teacher_logprob_per_token", "teacher_nll_per_byte", "forward_kl", "reverse_kl",
                "top1_agreement"],
    "diversity": ["distinct_1", "distinct_2", "distinct_3", "repetition_rate", "mean_length_words",
                  "mean_length_tokens"],
}
_X_KEYS = (*POSITION_KEYS, "global_step", "time", "timestamp")
_NOT_CURVES = ("skipped",)  # numeric keys of metrics.jsonl that are flags, not curves


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib  # 0.5-1.0 s with pyplot: imported only by the functions that draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def headline_metrics(result: dict) -> dict[str, float]:
    """`{"suite/metric": value}` of the headline numbers of one evaluation, EuroEval's and the caller's `extra`
    numbers (`{"suite": {"key": value}}`, e.g. benchmarks/run_experiments.py's privileged-run target) included."""
    flat: dict[str, float] = {}
    for suite, keys in HEADLINE.items():
        for key in keys:
            value = _number((result.get(suite) or {}).get(key))
            if value is not None:
                flat[f"{suite}/{key}"] = value
    for suite, metrics in (result.get("extra") or {}).items():  # numbers a caller computed beside the suites
        for key, value in (metrics or {}).items():
            if _number(value) is not None:
                flat[f"{suite}/{key}"] = float(value)
    for dataset, metrics in ((result.get("euroeval") or {}).get("datasets") or {}).items():
        for key, value in metrics.items():
            if _number(value) is not None and not key.endswith("_se"):
                flat[f"euroeval/{dataset}/{key}"] = float(value)
    return flat


def fmt_number(value: float | None) -> str:
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
    lines += [f"| {key} | {fmt_number(value)} |" for key, value in headline_metrics(result).items()]
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
    pyplot().close(fig)


def plot_evaluation(result: dict, path: str | Path) -> None:
    """One panel per suite: its headline numbers as labelled horizontal bars (scales differ between suites)."""
    flat = headline_metrics(result)
    suites = list(dict.fromkeys(key.split("/")[0] for key in flat)) or ["(none)"]
    fig, axes = pyplot().subplots(1, len(suites), figsize=(3.8 * len(suites), 2.8), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        items = [(k.split("/", 1)[1], v) for k, v in flat.items() if k.startswith(suite + "/")]
        positions = range(len(items))
        ax.barh(positions, [v for _, v in items], color="tab:blue")
        ax.set_yticks(positions, [k for k, _ in items], fontsize=8)
        ax.invert_yaxis()
        for y, (_, value) in zip(positions, items):
            ax.annotate(fmt_number(value), (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
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


def run_order(rows: list[dict]) -> tuple[list[dict], list[float], dict[int, int]]:
    """(rows in run order, the global step of each, {iteration: global step before it}).

    Rows with an iteration and a step are sorted by them (a line written twice keeps its last copy) and placed on
    the run's step axis; a log without them keeps its order, numbered from 1."""
    placed = [r for r in rows if isinstance(r.get("iteration"), int) and isinstance(r.get("step"), int)]
    if len(placed) < len(rows):
        return rows, [float(i) for i in range(1, len(rows) + 1)], {}
    unique = {(r["iteration"], r["step"]): r for r in placed}
    ordered = [unique[key] for key in sorted(unique)]
    offsets = iteration_offsets(ordered)
    return ordered, [float(offset_of(offsets, r["iteration"]) + r["step"]) for r in ordered], offsets


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` points (odd), shrinking at both ends."""
    half = window // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def smoothing_window(points: int) -> int:
    """About a tenth of the points, odd, between 1 and 25."""
    return max(1, min(25, round(points / 10)) // 2 * 2 + 1) if points >= 5 else 1


def curve_keys(rows: list[dict]) -> list[str]:
    """Numeric keys of the metrics rows, other than the x axes, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in _X_KEYS and key not in _NOT_CURVES and _number(value) is not None:
                keys.setdefault(key)
    return list(keys)


def _mark_iterations(ax, offsets: dict[int, int], iterations: list[int], last_x: float) -> None:
    """Dashed lines between iterations; "it. N" on a top axis when there are few enough to read."""
    starts = [offsets[it] for it in iterations]
    for start in starts[1:]:
        ax.axvline(start + 0.5, color="0.55", linestyle="--", linewidth=0.7, zorder=0)
    if len(iterations) <= 20:
        ends = starts[1:] + [last_x]
        top = ax.secondary_xaxis("top")
        top.set_xticks([(a + b + 1) / 2 for a, b in zip(starts, ends)], [f"it. {it}" for it in iterations], fontsize=7)
        top.tick_params(length=0, pad=1)


def learning_curves_figure(rows: list[dict]):
    """(figure, keys, window): one panel per numeric key against the run's global step (see `run_order`): the
    raw points (light) and their centred mean over `window` points (dark)."""
    ordered, x, offsets = run_order(rows)
    keys = curve_keys(ordered)
    if not keys:
        return None, [], 1
    columns = min(3, len(keys))
    fig, axes = pyplot().subplots(math.ceil(len(keys) / columns), columns,
                                  figsize=(4.2 * columns, 2.9 * math.ceil(len(keys) / columns)), squeeze=False)
    iterations = sorted({r["iteration"] for r in ordered}) if offsets else []
    window = smoothing_window(len(ordered))
    per_iteration = smooths_per_iteration(ordered, window) if iterations else False
    for ax, key in zip(axes.flat, keys):
        points = [(xi, _number(r.get(key))) for xi, r in zip(x, ordered) if _number(r.get(key)) is not None]
        px, py = [p[0] for p in points], [p[1] for p in points]
        ax.plot(px, py, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=0.8,
                marker="." if len(points) < 80 else None, markersize=3)
        for segment in _segments(points, offsets, iterations if per_iteration else []):
            if window > 1 and len(segment) >= 3:
                ys = moving_average([p[1] for p in segment], window)
                ax.plot([p[0] for p in segment], ys, color="tab:blue", linewidth=1.6)
        if iterations:
            _mark_iterations(ax, offsets, iterations, x[-1])
        ax.set_title(key, fontsize=9, pad=14 if len(iterations) <= 20 and iterations else 6)
        ax.set_xlabel("global step" if offsets else "row", fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig, keys, window


def smooths_per_iteration(ordered: list[dict], window: int) -> bool:
    """Smooth each iteration on its own (metrics such as the clip fraction restart with every iteration's fresh
    behaviour policy) when the iterations are long enough for the window; else across the whole run."""
    lengths = sorted(sum(1 for r in ordered if r["iteration"] == it) for it in {r["iteration"] for r in ordered})
    return lengths[len(lengths) // 2] >= window


def _segments(points: list[tuple[float, float]], offsets: dict[int, int], iterations: list[int]):
    """The points cut at the iteration boundaries (all of them in one piece when `iterations` is empty)."""
    if not iterations:
        return [points]
    starts = [offsets[it] for it in iterations[1:]]
    pieces: list[list] = [[] for _ in iterations]
    for point in points:
        pieces[sum(point[0] > start for start in starts)].append(point)
    return [piece for piece in pieces if piece]


def plot_curves(rows: list[dict], path: str | Path) -> list[str]:
    """Learning curves as a PNG (see `learning_curves_figure`); returns the keys plotted."""
    fig, keys, _ = learning_curves_figure(rows)
    if fig is not None:
        _savefig(fig, Path(path))
    return keys


def plot_evaluations(evaluations: list[dict], path: str | Path) -> list[str]:
    """One panel per headline metric, a line over the iterations of the evaluations that have one; nothing (an
    empty list) when fewer than two have one: the table says it all then."""
    placed = [e for e in evaluations if isinstance(e.get("iteration"), int)]
    if len(placed) < 2:
        return []
    tables = [headline_metrics(e) for e in placed]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    if not keys:
        return []
    columns = min(3, len(keys))
    rows_n = math.ceil(len(keys) / columns)
    fig, axes = pyplot().subplots(rows_n, columns, figsize=(4.2 * columns, 2.8 * rows_n), squeeze=False)
    iterations = [e["iteration"] for e in placed]
    for ax, key in zip(axes.flat, keys):
        points = [(it, t[key]) for it, t in zip(iterations, tables) if key in t]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:green")
        ax.set_xticks(sorted(set(iterations)))
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
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
    return fmt_number(value) if value is None or math.isfinite(value) else str(value)


def _curves_summary(rows: list[dict], keys: list[str]) -> list[str]:
    """first / last (NaN shown as NaN) and min / max (of the finite values) of each key over the run; with 2 to 12
    iterations, also each iteration's mean (of its finite values)."""
    ordered, _, offsets = run_order(rows)
    iterations = sorted({r["iteration"] for r in ordered}) if offsets else []
    per_iteration = 2 <= len(iterations) <= 12
    means = [f"mean it. {it}" for it in iterations] if per_iteration else []
    head = ["metric", "first", "last", "min", "max", *means]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key in keys:
        values = [v for v in (_any_number(r.get(key)) for r in ordered) if v is not None]
        finite = [v for v in values if math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (None, None)
        cells = [key, _fmt_any(values[0]), _fmt_any(values[-1]), fmt_number(low), fmt_number(high)]
        for it in iterations if per_iteration else []:
            mine = [v for v in (_number(r.get(key)) for r in ordered if r["iteration"] == it) if v is not None]
            cells.append(fmt_number(sum(mine) / len(mine)) if mine else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _evaluations_table(evaluations: list[dict]) -> list[str]:
    tables = [headline_metrics(e) for e in evaluations]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    lines = ["| evaluation | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for evaluation, table in zip(evaluations, tables):
        lines.append(f"| {evaluation['name']} | " + " | ".join(fmt_number(table.get(k)) for k in keys) + " |")
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
        fig, keys, window = learning_curves_figure(rows)
        if fig is not None:
            written["curves"] = run.reports / "learning_curves.png"
            _savefig(fig, written["curves"])
            ordered, _, offsets = run_order(rows)
            iterations = len({r["iteration"] for r in ordered})
            span = f"{len(ordered)} optimizer steps over {iterations} iteration(s)" if offsets else f"{len(rows)} rows"
            axis = ("x: the run's global optimizer step; dashed lines: iteration boundaries (numbers on top)"
                    if offsets else "x: row of the log")
            within = " within each iteration" if offsets and smooths_per_iteration(ordered, window) else ""
            smooth = (f"; dark line: centred mean of {window} points{within}, over the raw ones (light)"
                      if window > 1 else "")
            lines += [f"## Learning curves ({span})", "", f"**{curves_headline(rows)}**", "", f"{axis}{smooth}.", "",
                      "![learning curves](learning_curves.png)", ""]
            lines += _curves_summary(rows, keys) + [""]
    if evaluations:
        lines += ["## Evaluations", ""] + _evaluations_table(evaluations) + [""]
        if plot_evaluations(evaluations, run.reports / "evaluations.png"):
            written["evaluations"] = run.reports / "evaluations.png"
            lines += ["![evaluations](evaluations.png)", ""]
        else:
            remove_path(run.reports / "evaluations.png")  # a plot of earlier evaluations would now mislead
    if (run.logs / "tensorboard").is_dir():
        lines += [f"TensorBoard: `tensorboard --logdir {run.root}`", ""]
    written["markdown"] = run.reports / "report.md"
    atomic_write_text(written["markdown"], "\n".join(lines))
    return written


def report_name(checkpoint: str | Path, iteration: int | None) -> str:
    """`iter_0002` for a run's checkpoint, else the checkpoint directory's name made file-safe."""
    if iteration is not None:
        return f"iter_{iteration:04d}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(checkpoint)).name) or "model"
