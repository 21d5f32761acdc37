"""``kiln quickstart``: the demo road, no flags needed (``make demo``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer

from kiln.cli._console import console, progress_bar


def quickstart(
    out: Path = typer.Option(Path("kiln-repo"), "--out", help="Repository to write (replaced if it exists)."),
    report_dir: Path = typer.Option(Path("kiln-report"), "--report-dir", help="Where the HTML reports go."),
    fast: bool = typer.Option(False, "--fast", help="Fewer repeats: a smoke run, not figures to quote."),
    model: list[str] = typer.Option(
        ["minilm", "digits", "train"], "--model", help="Which demo roads to run: minilm, digits, train."
    ),
    no_serve: bool = typer.Option(False, "--no-serve", help="Skip the serving step."),
) -> None:
    """MiniLM, a digits classifier, a trained CNN and its distilled student: export -> optimize -> bench, then
    serve under load, with a summary."""
    from rich.table import Table

    from kiln.quickstart import quickstart as run
    from kiln.quickstart import serve_road, summary_rows

    with _Stages() as stage:
        results = run(out, report_dir, stage=stage, fast=fast, models=tuple(model))
        served = None if no_serve else serve_road(out, report_dir, stage, fast=fast, model=results[0].name)
    for result in results:
        console.print(result.search.table())
    table = Table(title="Kiln quickstart")
    rows = summary_rows(results)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    if served is not None:
        console.print(served.load.table())
        console.print(
            f"kiln serve: ready in {served.ready_s:.2f} s; stopped with SIGTERM after draining (exit code "
            f"{served.exit_code}); load report: {served.report_path}"
        )
    console.print(f"report: {report_dir / 'index.html'}")
    latest = results[0].search.chosen or results[0].exported
    console.print(
        f"next: kiln inspect {latest.path.parent}   |   kiln bench {latest.path.parent}   |   kiln serve {out}"
    )


class _Stages:
    """One progress bar per stage, each closed before the next opens (rich shows one live display at a time)."""

    def __init__(self) -> None:
        self._stack = ExitStack()

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def __call__(self, title: str) -> Callable[[str, float], None]:
        self._stack.close()
        self._stack = ExitStack()
        return self._stack.enter_context(progress_bar(title))
