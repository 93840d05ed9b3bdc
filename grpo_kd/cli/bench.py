"""`grpo-kd bench kernels`: the kernel comparison of benchmarks/bench_kernels.py, printed as a table.

The measurement logic lives in `grpo_kd.kernels.bench` (each method in its own subprocess); this module only
parses options, shows progress and prints the table with rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks that run the alternatives side by side.", no_args_is_help=True)


def bench_kernels(quick: bool, device: str, out: Path | None) -> None:
    """Run the kernel comparison on `device` ("auto", "cpu", "cuda"), print it, and write
    `<out>/<device slug>/kernels[-quick].{json,md}` when `out` is given."""
    from grpo_kd.kernels import bench, bench_report

    resolved = bench.resolve_device(device)
    command = "grpo-kd bench kernels" + (" --quick" if quick else "") + f" --device {device}"
    command += f" --out {out}" if out is not None else ""
    console = Console()
    with console.status("starting") as status:
        report = bench.run_suite(quick, resolved, progress=lambda c: status.update(
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


@bench_app.command("kernels")
def kernels(
    quick: bool = typer.Option(False, "--quick", help="Small shapes (seconds), for a smoke test."),
    device: str = typer.Option("auto", "--device", help="auto (the GPU if there is one), cpu or cuda."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write JSON and markdown under OUT/<device>/."),
) -> None:
    """Compare the fused kernels with eager PyTorch (and torch.compile / Liger-Kernel on a GPU)."""
    bench_kernels(quick, device, out)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
