"""Judging and writing the kernel benchmark report: ratios against eager / the matmul floor / Liger, targets,
the device slug, and the JSON + markdown files under `benchmarks/results/<device>/`.

Split from `bench.py` (which measures) so that the measuring worker stays small.
"""

from __future__ import annotations

import platform
import re
import statistics
from pathlib import Path

import torch

MEMORY_TARGET = 1 / 8  # CPU: at most one eighth of eager's peak
CPU_TIME_TARGET = 1.5  # CPU: at most 1.5x eager's time (the chunked path's floor is ~4/3: one matmul more)
GPU_TARGETS = {"floor": 1.3, "liger_speedup": 1.5, "extra_gib": 2.0}  # x floor time, x Liger speed, GiB


def judge(rows: list[dict]) -> None:
    """Add ratios against eager / the floor / Liger and whether each target is met (in place)."""
    ok = {(r["kernel"], r["method"]): r for r in rows if r.get("status") == "ok"}
    floor = ok.get(("floor", "matmuls"))
    for row in rows:
        if row.get("status") != "ok":
            continue
        eager = ok.get((row["kernel"], "eager"))
        if eager and row["method"] != "eager":
            row["memory_vs_eager"] = row["peak_bytes"] / max(eager["peak_bytes"], 1)
            row["time_vs_eager"] = row["time_ms"] / max(eager["time_ms"], 1e-9)
            mine, theirs = row.get("round_times_ms", []), eager.get("round_times_ms", [])
            if len(mine) > 1 and len(mine) == len(theirs):  # paired: the median of the per-round ratios
                row["round_ratios"] = [a / max(b, 1e-9) for a, b in zip(mine, theirs)]
                row["time_vs_eager"] = statistics.median(row["round_ratios"])
            row["value_diff_vs_eager"] = abs(row["value"] - eager["value"])
        if row["method"] != "grpo-kd":
            continue
        targets = []
        if row["device"] == "cpu" and row["kernel"] != "topk" and "memory_vs_eager" in row:
            met = row["memory_vs_eager"] <= MEMORY_TARGET
            targets.append(f"memory <= 1/8 eager: {'met' if met else 'MISSED'}")
            met = row["time_vs_eager"] <= CPU_TIME_TARGET
            targets.append(f"time <= 1.5x eager: {'met' if met else 'MISSED'}")
        if row["device"] == "cuda" and row["kernel"] != "topk":
            if floor:
                row["time_vs_floor"] = row["time_ms"] / floor["time_ms"]
                met = row["time_vs_floor"] <= GPU_TARGETS["floor"]
                targets.append(f"time <= 1.3x floor: {'met' if met else 'MISSED'}")
            liger = ok.get((row["kernel"], "liger"))
            if liger:
                row["speedup_vs_liger"] = liger["time_ms"] / row["time_ms"]
                met = row["speedup_vs_liger"] >= GPU_TARGETS["liger_speedup"]
                targets.append(f">= 1.5x faster than Liger: {'met' if met else 'MISSED'}")
            met = row["peak_bytes"] <= GPU_TARGETS["extra_gib"] * 2**30
            targets.append(f"<= 2 GiB extra memory: {'met' if met else 'MISSED'}")
        row["targets"] = "; ".join(targets)

def device_slug(device: str) -> str:
    """`cpu-<model name>` or `cuda-<gpu name>`, lower case, dashes."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                name = next(line.split(":", 1)[1] for line in handle if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{device}-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")

# ----------------------------------------------------------------------------------------------- output


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def table_rows(report: dict) -> list[list[str]]:
    """The report as table cells: kernel, method, shape, time, peak memory, ratios, targets / notes."""
    out = []
    for r in report["rows"]:
        shape = f"N={r['N']} H={r['H']} V={r['V']} {r['dtype']}"
        if r.get("status") != "ok":
            out.append([r["kernel"], r["method"], shape, "", "", "", r.get("status", "?") + ": " + r.get("note", "")])
            continue
        ratios = []
        if "memory_vs_eager" in r:
            ratios.append(f"mem {r['memory_vs_eager']:.3f}x eager")
        if "time_vs_eager" in r:
            rounds = f" (rounds {', '.join(f'{x:.2f}' for x in r['round_ratios'])})" if "round_ratios" in r else ""
            ratios.append(f"time {r['time_vs_eager']:.2f}x eager{rounds}")
        if "time_vs_floor" in r:
            ratios.append(f"time {r['time_vs_floor']:.2f}x floor")
        if "speedup_vs_liger" in r:
            ratios.append(f"{r['speedup_vs_liger']:.2f}x faster than Liger")
        if "value_diff_vs_eager" in r:
            ratios.append(f"|loss - eager| {r['value_diff_vs_eager']:.1e}")
        out.append([r["kernel"], r["method"], shape, f"{r['time_ms']:,.1f}", _mib(r["peak_bytes"]),
                    "; ".join(ratios), r.get("targets", "")])
    return out


HEADER = ["kernel", "method", "shape", "time ms (median)", "peak MiB above inputs", "ratios", "targets"]


def markdown(report: dict, command: str) -> str:
    lines = [
        f"# Kernel benchmarks: {report['device']}{' (quick)' if report['quick'] else ''}",
        "",
        f"Command: `{command}`  ",
        f"torch {report['torch']}, {report['threads']} threads, {report['cpu_count']} CPUs"
        + (f"; load average {report['load_before']} before the run, {report['load_after']} after." if "load_before"
           in report else "."),
        "",
    ]
    if report.get("rounds", 1) > 1:
        lines += [
            f"{report['rounds']} rounds: every case ran once per round, each time in a fresh process (every other "
            "round in reverse order); time = the median over rounds of each round's median; time ratio = the median "
            "of the per-round ratios (listed); peak = the largest round's.",
            "",
        ]
    lines += [
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    lines += ["", f"Memory: {report['memory_method']}", ""]
    return "\n".join(lines)


def write_report(report: dict, command: str, out_root: Path) -> tuple[Path, Path]:
    """Write `<out_root>/<device>/kernels[-quick].{json,md}` atomically; returns both paths."""
    from grpo_kd.fsutil import atomic_write_json, atomic_write_text

    stem = "kernels-quick" if report["quick"] else "kernels"
    folder = Path(out_root) / report["device"]
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    atomic_write_json(json_path, {**report, "command": command})
    atomic_write_text(md_path, markdown(report, command))
    return json_path, md_path
