"""One progress bar for every long evaluation loop (rich, on stderr, so that stdout stays machine-readable)."""

from __future__ import annotations

from typing import Iterable, Sized, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

_console = Console(stderr=True)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """Yield `items` while a bar named `description` advances; silent when stderr is not a terminal."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console, transient=True, disable=not _console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
