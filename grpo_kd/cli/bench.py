"""`grpo-kd bench kernels`: the kernel comparison of benchmarks/bench_kernels.py, printed as a table; with
`--static`, the static GPU check (every Triton kernel compiled for sm_80 / sm_90 / sm_100 without a GPU).

The measurement logic lives in `grpo_kd.kernels.bench` (each method in its own subprocess) and
`grpo_kd.kernels.static_check`; this module only parses options, shows progress and prints tables with rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks that run the alternatives side by side.", no_args_is_help=True)


def bench_kernels(quick: bool, device: str, out: Path | None, rounds: int = 1) -> None:
    """Run the kernel comparison on `device` ("auto", "cpu", "cuda") `rounds` times interleaved, print it, and
    write `<out>/<device slug>/kernels[-quick].{json,md}` when `out` is given."""
    from grpo_kd.errors import GrpoKdError
    from grpo_kd.kernels import bench, bench_report

    if rounds < 1:
        raise GrpoKdError(f"--rounds must be at least 1, got {rounds}")
    resolved = bench.resolve_device(device)
    command = "grpo-kd bench kernels" + (" --quick" if quick else "") + f" --device {device}"
    command += f" --rounds {rounds}" if rounds > 1 else ""
    command += f" --out {out}" if out is not None else ""
    console = Console()
    with console.status("starting") as status:
        report = bench.run_suite(quick, resolved, rounds=rounds, progress=lambda c: status.update(
            f"measuring {c.kernel} / {c.method} at N={c.N} H={c.H} V={c.V} {c.dtype} in a fresh process"))
    table = Table(title=f"Kernel benchmarks: {report['device']}{' (quick)' if quick else ''}")
    for name in bench_report.HEADER:
        table.add_column(name, overflow="fold")
    for cells in bench_report.table_rows(report):
        table.add_row(*cells)
    console.print(table)
    console.print(f"[dim]Memory: {report['memory_method']}[/]")
    if out is not None:
        for path in bench_report.write_report(report, command, out):
            console.print(f"wrote {path}")


def static_check(archs: list[int], dtypes: list[str], hidden: list[int], vocab: list[int], ks: list[int],
                 kernels: list[str], json_file: Path | None, markdown_file: Path | None, save_cubin: Path | None,
                 jobs: int, anchors: bool, command: str) -> None:
    """Compile the matrix, print the table, write the files; exit 1 when one of our launches fails the check."""
    from grpo_kd.errors import GrpoKdError
    from grpo_kd.fsutil import atomic_write_json, atomic_write_text
    from grpo_kd.kernels import static_check as sc

    bad = [a for a in archs if a not in (80, 90, 100)] + [d for d in dtypes if d not in sc.DTYPES]
    bad += [k for k in kernels if k not in sc.KERNELS]
    if bad:
        raise GrpoKdError(f"--static: unknown value(s) {bad}; arch 80/90/100, dtype bf16/fp16/fp32, kernel "
                          f"{'/'.join(sc.KERNELS)}")
    if any(k < 1 or k > 256 for k in ks):
        raise GrpoKdError(f"--k must lie in 1..256 (the Triton top-k's range), got {ks}")
    entries = sc.expand(tuple(kernels or sc.KERNELS), tuple(archs) or None, tuple(dtypes or sc.DTYPES),
                        tuple(hidden or sc.HIDDEN), tuple(vocab or sc.VOCAB), tuple(ks or sc.TOPK), anchors=anchors)
    console = Console(stderr=True)
    done = []
    with console.status(f"compiling {len(entries)} distinct launches") as status:
        rows = sc.run_static(entries, jobs, str(save_cubin) if save_cubin else None, progress=lambda r: (
            done.append(r), status.update(f"compiled {len(done)}/{len(entries)}: {r['kernel']} sm_{r['arch']} "
                                          f"{r['dtype']} {r.get('config_label', '')}")))
    table = Table(title="Static GPU check (compiled here, no GPU)")
    for name in sc.HEADER:
        table.add_column(name, overflow="fold")
    for cells in sc.table_rows(rows):
        table.add_row(*cells)
    Console().print(table)
    if json_file:
        atomic_write_json(json_file, {"command": command, "rows": rows})
    if markdown_file:
        atomic_write_text(markdown_file, sc.markdown(rows, command))
    failed = sc.failures(rows)
    if failed:
        first = failed[0]
        raise GrpoKdError(f"static check failed for {len(failed)} launch(es); first: {first['kernel']} "
                          f"sm_{first['arch']} {first['dtype']}: {first.get('error') or '; '.join(first['problems'])}")
    console.print(f"static check passed: {len([r for r in rows if r['kernel'] in sc.KERNELS])} launches, "
                  "no spill, shared memory within limits, tensor-core MMA for half inputs, pipelined")


@bench_app.command("kernels")
def kernels(
    quick: bool = typer.Option(False, "--quick", help="Small shapes (seconds), for a smoke test."),
    device: str = typer.Option("auto", "--device", help="auto (the GPU if there is one), cpu or cuda."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write JSON and markdown under OUT/<device>/."),
    rounds: int = typer.Option(1, "--rounds", help="Run every case this many times, interleaved (median)."),
    static: bool = typer.Option(False, "--static", help="Compile for NVIDIA targets here instead (no GPU needed)."),
    arch: list[int] = typer.Option([], "--arch", help="--static: 80, 90 or 100 (repeatable; default 80 and 90)."),
    dtype: list[str] = typer.Option([], "--dtype", help="--static: bf16, fp16, fp32 (repeatable; default all)."),
    hidden: list[int] = typer.Option([], "--hidden", help="--static: hidden sizes (repeatable)."),
    vocab: list[int] = typer.Option([], "--vocab", help="--static: vocabulary sizes (repeatable)."),
    k: list[int] = typer.Option([], "--k", help="--static: top-k sizes, 1..256 (repeatable)."),
    kernel: list[str] = typer.Option([], "--kernel", help="--static: stats, jsd_rest, dense_grad, topk (repeatable)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="--static: write the table as JSON."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="--static: write the table as markdown."),
    save_cubin: Optional[Path] = typer.Option(None, "--save-cubin", help="--static: keep the cubins in DIR."),
    jobs: int = typer.Option(2, "--jobs", help="--static: compile in this many processes."),
    anchors: bool = typer.Option(True, "--anchors/--no-anchors", help="--static: also compile CCE / Liger."),
) -> None:
    """Compare the fused kernels with eager PyTorch (and torch.compile / Liger-Kernel on a GPU); or, with
    --static, compile every Triton kernel for sm_80/sm_90/sm_100 and check registers, spills, shared memory
    and the MMA instruction (exit 1 when a launch fails)."""
    if static:
        import sys

        command = "grpo-kd " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "grpo-kd bench kernels --static"
        static_check(arch, dtype, hidden, vocab, k, kernel, json_file, markdown_file, save_cubin, max(1, jobs),
                     anchors, command)
        return
    bench_kernels(quick, device, out, rounds)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
