"""A `Comparison` (compare.py) as markdown tables, JSON and one PNG, written atomically.

    paths = write_comparison(comparison, "reports", "comparison")   # comparison.md, .json, .png
    comparison_markdown(comparison, image="comparison.png")          # the tables alone, e.g. for docs/

Key design choice: the markdown is what docs/experiments.md takes as it is (benchmarks/run_experiments.py calls
`comparison_markdown`), so every table says how its spread is computed and a cell carries its run count:
`-3.21 [-3.35, -3.07] (n=3)`.
"""

from __future__ import annotations

import math
from pathlib import Path

from grpo_kd.evaluate.compare import Comparison
from grpo_kd.evaluate.report import fmt_number, pyplot
from grpo_kd.evaluate.spread import METHOD_TEXT, Spread
from grpo_kd.fsutil import atomic_savefig, atomic_write_json, atomic_write_text

_DIRECTION_TEXT = {"max": "higher is better", "min": "lower is better", None: "no better direction"}


def _cell(s: Spread | None) -> str:
    if s is None:
        return "–"
    if s.n == 1:
        return f"{fmt_number(s.mean)} (n=1)"
    return f"{fmt_number(s.mean)} [{fmt_number(s.low)}, {fmt_number(s.high)}] (n={s.n})"


def _verdict(beyond: bool | None) -> str:
    return {True: "**yes**", False: "no", None: "n/a (one run)"}[beyond]


def comparison_markdown(comparison: Comparison, image: str | None = None, title: str | None = None) -> str:
    from grpo_kd.evaluate.compare import better

    c = comparison
    runs = sum(len(g.runs) for g in c.groups)
    counted = f"{runs} run{'s' * (runs != 1)} in {len(c.groups)} group{'s' * (len(c.groups) != 1)}"
    lines = [f"# {title or 'Comparison'}: {counted}", "",
             f"Each cell: {METHOD_TEXT[c.method]}; `[low, high] (n=runs)`. A difference is larger than the seed "
             "spread when the two intervals do not overlap (not judged with a single run).", "",
             "| group | runs (seed) | settings that set it apart |", "|---|---|---|"]
    for g in c.groups:
        members = ", ".join(f"{r.name} ({r.seed})" for r in g.runs)
        settings = ", ".join(f"`{k}={v}`" for k, v in g.settings.items()) or "–"
        lines.append(f"| {g.label} | {members} | {settings} |")
    for metric in c.metrics:
        iterations = sorted({it for g in c.groups for it in g.iterations(metric)})
        lines += ["", f"## {metric} ({_DIRECTION_TEXT[better(metric)]})", "",
                  "| group | " + " | ".join(f"it. {it}" for it in iterations) + " |", "|---" * (len(iterations) + 1) + "|"]
        for g in c.groups:
            lines.append(f"| {g.label} | " + " | ".join(_cell(g.spread(metric, it, c.method)) for it in iterations) + " |")
    if c.best:
        lines += ["", f"## Best checkpoint of each run (by {c.best_metric}, {_DIRECTION_TEXT[c.best[0].direction]})", "",
                  "| run | group | seed | iteration | value | checkpoint |", "|---|---|---|---|---|---|"]
        lines += [f"| {b.run} | {b.group} | {b.seed} | {b.iteration} | {fmt_number(b.value)} | `{b.checkpoint}` |"
                  for b in c.best]
    if c.differences:
        lines += ["", "## Differences and the seed spread", "",
                  f"At each group's last iteration with the metric; against the group's own first iteration and "
                  f"against {'`' + c.baseline + '`' if c.baseline else 'no baseline group'}.", "",
                  "| metric | group | against | it. | difference of means | larger than the seed spread |",
                  "|---|---|---|---|---|---|"]
        for d in c.differences:
            lines.append(f"| {d.metric} | {d.group} | {d.against} | {d.iteration} | {d.delta:+.4g} | "
                         f"{_verdict(d.beyond_spread)} |")
    if image:
        lines += ["", f"![comparison]({image})"]
    return "\n".join(lines) + "\n"


def comparison_json(comparison: Comparison) -> dict:
    c = comparison
    return {
        "interval": c.method, "interval_text": METHOD_TEXT[c.method], "metrics": c.metrics, "baseline": c.baseline,
        "groups": [{"label": g.label, "settings": g.settings, "runs": [{"name": r.name, "path": str(r.path),
                                                                        "seed": r.seed} for r in g.runs]}
                   for g in c.groups],
        "values": {m: {g.label: {str(it): g.spread(m, it, c.method).to_json() for it in g.iterations(m)}
                       for g in c.groups} for m in c.metrics},
        "best_metric": c.best_metric,
        "best": [b.__dict__ for b in c.best],
        "differences": [{"metric": d.metric, "group": d.group, "against": d.against, "iteration": d.iteration,
                         "delta": d.delta, "this": d.this.to_json(), "other": d.other.to_json(),
                         "beyond_spread": d.beyond_spread} for d in c.differences],
    }


def plot_comparison(comparison: Comparison, path: str | Path) -> None:
    """One panel per metric: each group's mean over iterations with its interval as error bars."""
    c = comparison
    plt = pyplot()
    columns = min(3, len(c.metrics))
    rows = math.ceil(len(c.metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.0 * rows + 0.5), squeeze=False,
                             layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, c.metrics):
        for index, g in enumerate(c.groups):
            its = g.iterations(metric)
            spreads = [g.spread(metric, it, c.method) for it in its]
            shift = (index - (len(c.groups) - 1) / 2) * 0.06  # the groups' bars side by side, not on top
            ax.errorbar([it + shift for it in its], [s.mean for s in spreads],
                        yerr=[[s.mean - s.low for s in spreads], [s.high - s.mean for s in spreads]],
                        marker="o", markersize=3, capsize=3, linewidth=1.2, color=colours[index % len(colours)],
                        label=g.label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(c.metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    bars = "95% t interval" if c.method == "t95" else "min-max range"
    fig.legend(handles, labels, loc="outside upper center", ncol=min(4, len(labels)), fontsize=8, frameon=False,
               title=f"mean over seeds, bars: {bars}", title_fontsize=8)
    atomic_savefig(fig, Path(path), dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_comparison(comparison: Comparison, out_dir: str | Path, name: str = "comparison",
                     title: str | None = None) -> dict[str, Path]:
    """`<name>.md`, `.json` and `.png` under `out_dir`, each written atomically; returns their paths."""
    out = Path(out_dir)
    paths = {suffix: out / f"{name}.{suffix}" for suffix in ("md", "json", "png")}
    plot_comparison(comparison, paths["png"])
    atomic_write_json(paths["json"], comparison_json(comparison))
    atomic_write_text(paths["md"], comparison_markdown(comparison, paths["png"].name, title))
    return paths
