"""What every command shares: reading `--config FILE` plus dotted overrides, and failing with one clear line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from grpo_kd.config import Config, load_config

console = Console(stderr=True)

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file; defaults apply where it is silent.")
OVERRIDES_ARGUMENT = typer.Argument(None,
                                    help="Dotted overrides, e.g. loss.policy.beta=0.04 rollout.group_size=8.")
ITERATION_OPTION = typer.Option(1, "--iteration", "-i", min=1, help="Iteration number (1-based).")
RUN_ARGUMENT = typer.Argument(..., help="The run directory (runs/NAME).")


def resolve_config(config: Optional[Path], overrides: Optional[list[str]]) -> Config:
    return load_config(config, overrides or [])


def fail(message: str, code: int = 1) -> None:
    """Print one line on stderr and exit non-zero."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("GRPO_KD_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes (imported by peft when installed) warns at import, on every CPU, that an optional faster 4-bit
    # kernel package is absent; its own CPU kernels run without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
