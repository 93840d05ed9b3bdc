"""`grpo-kd bench kernels`: the kernel comparison of benchmarks/, printed as a table."""

from __future__ import annotations

import typer

from grpo_kd.cli._common import not_available

bench_app = typer.Typer(help="Benchmarks that run the alternatives side by side.", no_args_is_help=True)


@bench_app.command("kernels")
def kernels() -> None:
    """Compare the fused kernels with eager PyTorch (and torch.compile / Liger-Kernel on a GPU)."""
    not_available("bench kernels", issue=3)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
