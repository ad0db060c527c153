"""A byte-counting progress bar on stderr for downloads and ingests (rich), drawn only on a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def byte_bar(label: str, total: int | None, *, done: int = 0, enabled: bool = True,
             speed: bool = False) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n_bytes)``. A transient bar with bytes done, and the speed (``speed``) or the time
    left; nothing where ``enabled`` is false or stderr is not a terminal (rich would print a blank line)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    rate = TransferSpeedColumn() if speed else TimeRemainingColumn()
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), rate, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)
