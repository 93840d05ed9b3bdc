"""The `grpo-kd` command line: one Typer app, one module per command group.

Each module under `grpo_kd/cli/` has a `register(app)` that adds its commands. `main()` turns a `GrpoKdError`
(bad input, a missing file, a capability not built yet) and an error of the machine (a full disk, a read-only file
system: `describe_os_error`) into one line on stderr and a non-zero exit code; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from grpo_kd.cli import bench, cache, chain, compare, config_cmd, evaluate, phases, plan, tiny
from rich.markup import escape

from grpo_kd.cli._common import console
from grpo_kd.errors import GrpoKdError, describe_os_error

app = typer.Typer(
    name="grpo-kd",
    help="On-policy distillation of large language models: rollout -> cache-teacher -> update, on SLURM or here.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (chain, plan, phases, cache, evaluate, compare, config_cmd, bench, tiny):
    module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code instead of raising for `GrpoKdError`."""
    try:
        app(args=argv, standalone_mode=True)
    except GrpoKdError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except Exception as exc:  # an error of the machine (a full disk) is one line too; anything else is a bug
        why = describe_os_error(exc)
        if why is None:
            raise
        console.print(f"[bold red]error:[/] {escape(why)}", highlight=False, soft_wrap=True)
        return 1
    except SystemExit as exc:  # click's normal exit path
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
