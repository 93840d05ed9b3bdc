"""`grpo-kd config show` and `grpo-kd config validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from grpo_kd.cli._common import CONFIG_OPTION, OVERRIDES_ARGUMENT, fail, resolve_config
from grpo_kd.config import load_config, problems, to_yaml
from grpo_kd.errors import GrpoKdError

config_app = typer.Typer(help="Show and check configuration files.", no_args_is_help=True)


@config_app.command("show")
def show(config: Optional[Path] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Print the resolved config (defaults, then FILE, then overrides) as YAML."""
    typer.echo(to_yaml(resolve_config(config, overrides)), nl=False)


@config_app.command("validate")
def validate(
    files: list[Path] = typer.Argument(..., help="Config files to check."),
    schema_only: bool = typer.Option(False, "--schema-only",
                                     help="Check keys and values only, not the models, data and vocabularies "
                                          "the config names (for a config written for another machine)."),
) -> None:
    """Check config files: keys and types, every rule on the values, then the files they name (models, data,
    vocabularies) as a phase would; every problem on its own line, exit 1 if any file is invalid."""
    out = Console()
    bad = 0
    for file in files:
        found = _problems(file, schema_only)
        if found:
            bad += 1
            for problem in found:
                out.print(f"[red]invalid[/] {file}: {problem}", highlight=False, soft_wrap=True)
        else:
            out.print(f"[green]ok[/] {file}", highlight=False)
    if bad:
        fail(f"{bad} of {len(files)} config file(s) invalid")


def _problems(file: Path, schema_only: bool) -> list[str]:
    """Every rule the file breaks; when it breaks none, the first problem of the files it names (unless
    `schema_only`)."""
    try:
        cfg = load_config(file, check_rules=False)
    except GrpoKdError as exc:  # a ConfigError, or a file that is not UTF-8 text
        return [str(exc)]
    found = problems(cfg)
    if found or schema_only:
        return found
    from grpo_kd.train.preflight import check_inputs  # the training stack: only for this part

    try:
        check_inputs(cfg)
    except GrpoKdError as exc:
        return [str(exc)]
    return []


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
