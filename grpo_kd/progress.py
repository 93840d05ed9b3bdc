"""One progress bar for every long loop (rich, on stderr, so that stdout stays machine-readable).

    for batch in progress(batches, "rollout"): ...            # one step per item
    with counter("teacher shard 0", total=tokens, unit="tokens") as advance:
        advance(n)                                              # steps of any size (tokens, bytes)

Both are silent when stderr is not a terminal (SLURM logs, pytest, pipes), so logs get the phase's one-line
summaries instead of thousands of redraws.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sized, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_console = Console(stderr=True)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """Yield `items` while a bar named `description` advances by one per item."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with counter(description, total) as advance:
        for item in items:
            yield item
            advance(1)


@contextlib.contextmanager
def counter(description: str, total: int | None, unit: str = "", enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar that the caller advances by any amount: `advance(n)`; `unit` is printed after the count."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=_console, transient=True,
                  disable=not (enabled and _console.is_terminal)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda amount: bar.advance(task, amount)
