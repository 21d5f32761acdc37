"""Consoles and the progress bar every long step uses."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kiln.errors import ConfigError

# Piped output (CI logs, `make demo | tee`) gets a wide, fixed width so tables do not wrap into columns of words.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


@contextmanager
def progress_bar(title: str) -> Iterator[Callable[[str, float], None]]:
    """A progress bar driven by the library's ``progress(message, fraction)`` callbacks.

    Piped or captured stderr gets no bar at all: a frozen frame would read like a second error line, and even a
    transient bar leaves an empty line there, above the one-line error of a failed run.
    """
    if not err_console.is_terminal:
        yield lambda message, fraction: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[step]}"),
        console=err_console,
    ) as bar:
        task = bar.add_task(title, total=1.0, step="")

        def update(message: str, fraction: float) -> None:
            bar.update(task, completed=min(max(fraction, 0.0), 1.0), step=message)

        yield update
        bar.update(task, completed=1.0, step="done")


def parse_ints(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"1,8,32"`` -> ``(1, 8, 32)``; a clear error for anything else."""
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f'{option} "{text}" must be a comma-separated list of positive integers, e.g. 1,8,32')
    return values
