"""`grpo-kd rollout`, `grpo-kd cache-teacher` and `grpo-kd update`: the three phases of an iteration; and
`grpo-kd sft`, the optional phase 0 before iteration 1.

Each command resolves its shard and calls `grpo_kd.train.phases.run_phase`, the same function `grpo-kd run`
uses. The phase modules are imported inside the commands: importing them pulls in torch and transformers
(seconds), which `grpo-kd --help` and the inspection commands need not pay for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grpo_kd.cli._common import CONFIG_OPTION, ITERATION_OPTION, OVERRIDES_ARGUMENT, resolve_config, setup_logging

SHARD_OPTION = typer.Option(None, help="Shard index J (default: SLURM_ARRAY_TASK_ID or 0).")


def rollout(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    shard: Optional[int] = SHARD_OPTION,
    num_shards: Optional[int] = typer.Option(
        None, help="Number of shards N (default: SLURM_ARRAY_TASK_COUNT, else rollout.num_shards)."
    ),
) -> None:
    """Sample G completions per prompt with the current student and store them with their log-probs."""
    cfg = resolve_config(config, overrides)
    run_phase_command(cfg, "rollout", iteration, shard, num_shards)


def update(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of this phase."),
) -> None:
    """Train the student on the rollouts and the teacher cache, then write the iteration's checkpoint.

    Under `torchrun` every rank runs this; SIGTERM / SIGUSR2 checkpoint and exit with the requeue code."""
    cfg = resolve_config(config, overrides)
    run_phase_command(cfg, "update", iteration, None, None, resume=resume)


def sft(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of this phase."),
) -> None:
    """Phase 0: fine-tune the student on prompt + continuation pairs or plain text (the config's `sft` section),
    writing checkpoints/iter_0000, which iteration 1 starts from. `grpo-kd run` and `chain submit` run it first when
    sft.enabled. Under `torchrun` every rank runs this; SIGTERM / SIGUSR2 checkpoint and exit with the requeue code."""
    cfg = resolve_config(config, overrides)
    run_phase_command(cfg, "sft", 0, None, None, resume=resume)


def cache_teacher(
    config: Optional[Path] = CONFIG_OPTION,
    overrides: Optional[list[str]] = OVERRIDES_ARGUMENT,
    iteration: int = ITERATION_OPTION,
    shard: Optional[int] = SHARD_OPTION,
    num_shards: Optional[int] = typer.Option(None, help="Number of shards N (default: SLURM_ARRAY_TASK_COUNT)."),
) -> None:
    """Score the iteration's rollouts with the teacher and write its top-k log-probs to the cache."""
    cfg = resolve_config(config, overrides)
    run_phase_command(cfg, "cache-teacher", iteration, shard, num_shards)


def run_phase_command(cfg, phase: str, iteration: int, shard: int | None, num_shards: int | None, *,
                      resume: bool = False) -> None:
    """What every phase command does: resolve this process's shard (flags, else the SLURM array), run the phase,
    print its summary; an update stopped by a signal exits with the requeue code."""
    from grpo_kd.paths import TRAINING_PHASES
    from grpo_kd.shards import resolve_shard
    from grpo_kd.train.phases import UpdateInterrupted, default_num_shards, run_phase
    from grpo_kd.train.signals import REQUEUE_EXIT_CODE

    setup_logging()
    j, n = (0, 1) if phase in TRAINING_PHASES else resolve_shard(shard, num_shards, default_num_shards(cfg, phase))
    try:
        result = run_phase(cfg, phase, iteration, shard=j, num_shards=n, resume=resume)
    except UpdateInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(REQUEUE_EXIT_CODE) from None
    typer.echo(result.line)


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout)
    app.command("cache-teacher")(cache_teacher)
    app.command("update")(update)
    app.command("sft")(sft)
