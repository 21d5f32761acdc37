"""The ``kiln`` command: one thin module per verb, each calling the library function a user would call."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import typer

from kiln.cli._console import err_console
from kiln.cli.bench import bench
from kiln.cli.export import export
from kiln.cli.inspect import inspect
from kiln.cli.optimize import optimize
from kiln.cli.quickstart import quickstart
from kiln.cli.serve import serve
from kiln.cli.train import train
from kiln.config import BenchSettings, ExportSettings, OptimizeSettings, ServeSettings, check_variables
from kiln.errors import KilnError

app = typer.Typer(
    name="kiln",
    help="Kiln: take a model from training to fast, measured production serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for verb in (export, optimize, bench, inspect, quickstart, serve, train):
    app.command(verb.__name__)(verb)

EXIT_USER_ERROR = 2


def _check_variables() -> None:
    """Refuse a misspelt ``KILN_*`` variable (``KILN_API_KEY`` for ``KILN_API_KEYS`` left a server open).

    Every settings class a variable can set is checked, but train's and load's only when a variable names none of
    the others' settings: importing them costs seconds (PyTorch), which ``kiln serve`` should not pay to start.
    """
    core = (ExportSettings, OptimizeSettings, BenchSettings, ServeSettings)
    known = {f.name for cls in core for f in dataclasses.fields(cls)}
    if all(v[5:].lower() in known for v in os.environ if v.startswith("KILN_")):
        return
    from kiln.bench import LoadSettings
    from kiln.train import TrainSettings

    check_variables(os.environ, (*core, LoadSettings, TrainSettings))


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
) -> None:
    _check_variables()
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        # ORT's quantizer logs advice on the root logger at WARNING; it is noise for a CLI user.
        logging.getLogger().setLevel(max(level, logging.ERROR))
        logging.getLogger("kiln").setLevel(level)


def main() -> None:
    """Entry point: a KilnError prints one line (value, rule, fix) and exits 2; --debug shows the traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Kiln never downloads at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.markup import escape  # messages quote config tables ("[laod]"): text, not rich markup

    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:  # a flag of the app, taken anywhere on the line: `kiln export model.txt --debug` too
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        # NOTE: without standalone mode, typer turns Ctrl-C (and a training run's SIGTERM, which the loop raises as
        # KeyboardInterrupt after its checkpoint) into a returned 130, not an exception: it was dropped, exit 0
        code = app(args=args, standalone_mode=False)
    except KilnError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        exits, usage_errors, aborts = _click_exceptions()
        if isinstance(exc, exits):
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, usage_errors):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(EXIT_USER_ERROR)
        if isinstance(exc, aborts):
            sys.exit(1)
        if debug:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (run again with --debug for the "
            "traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if code == 130:
        err_console.print("[yellow]interrupted[/]")
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_exceptions() -> tuple[tuple[type[Exception], ...], ...]:
    """Click's ``Exit``, ``ClickException`` (a bad flag or value: ``--runs x``, ``--bogus``) and ``Abort`` classes.

    NOTE: recent typer (0.29 here) vendors its own click (``typer._click``), whose exceptions are not
    ``click``'s: checking ``click.ClickException`` alone turned every usage mistake into an "internal error" with
    exit code 1. Both are taken; typer's own classes are reached through its public ``Exit``, ``Abort`` and
    ``BadParameter``.
    """
    import click

    vendored = [cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"]
    return (
        (click.exceptions.Exit, typer.Exit),
        (click.ClickException, *vendored),
        (click.exceptions.Abort, typer.Abort),
    )
