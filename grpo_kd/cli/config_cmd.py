"""`grpo-kd config show` and `grpo-kd config validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from grpo_kd.cli._common import CONFIG_OPTION, OVERRIDES_ARGUMENT, fail, resolve_config
from grpo_kd.config import ConfigError, load_config, to_yaml

config_app = typer.Typer(help="Show and check configuration files.", no_args_is_help=True)


@config_app.command("show")
def show(config: Optional[Path] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Print the resolved config (defaults, then FILE, then overrides) as YAML."""
    typer.echo(to_yaml(resolve_config(config, overrides)), nl=False)


@config_app.command("validate")
def validate(files: list[Path] = typer.Argument(..., help="Config files to check.")) -> None:
    """Check config files against the schema; one line per file, exit 1 if any is invalid."""
    out = Console()
    bad = 0
    for file in files:
        try:
            load_config(file)
        except ConfigError as exc:
            bad += 1
            out.print(f"[red]invalid[/] {exc}", highlight=False, soft_wrap=True)
        else:
            out.print(f"[green]ok[/] {file}", highlight=False)
    if bad:
        fail(f"{bad} of {len(files)} config file(s) invalid")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
