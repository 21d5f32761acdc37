"""``kiln optimize``: the accuracy-guarded, hardware-aware search over an artifact."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.markup import escape

from kiln.cli._console import console, parse_ints, progress_bar


def optimize(
    model: Path = typer.Argument(..., help="A model directory (latest version) or a version directory."),
    version: int = typer.Option(None, "--version", help="Version to optimize (default: latest)."),
    max_accuracy_drop: float = typer.Option(
        None, "--max-accuracy-drop", help="Largest relative task-accuracy loss allowed (default 0.01 = 1%)."
    ),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Embedding guard: mean cosine to the parent."),
    time_budget: float = typer.Option(None, "--time-budget", help="Seconds the search may spend (default 600)."),
    recipes: str = typer.Option(None, "--recipes", help="Comma-separated recipe names (default: all that apply)."),
    batch_sizes: str = typer.Option(None, "--batch-sizes", help="Batch sizes to measure, e.g. 1,32."),
    target_batch_size: int = typer.Option(None, "--target-batch-size", help="Batch size the choice optimizes."),
    objective: str = typer.Option(
        None, "--objective", help="What to maximise within the budget: speed (default) or size."
    ),
    calibration: Path = typer.Option(
        None, "--calibration", help=".npz of calibration inputs (arrays named like the model inputs)."
    ),
    eval_data: Path = typer.Option(
        None,
        "--eval-data",
        help=".npz of held-out inputs (named like the model inputs) and optional labels, for a model exported "
        "without any.",
    ),
    report: Path = typer.Option(None, "--report", help="Write the search report as JSON here."),
    config: Path = typer.Option(None, "--config", help="TOML config file (\\[optimize] table)."),
) -> None:
    """Search fusion / INT8 / fp16 variants; keep the fastest that stays within the accuracy budget."""
    from kiln.artifact import load
    from kiln.config import OptimizeSettings, resolve
    from kiln.data import load_eval_npz
    from kiln.errors import ConfigError
    from kiln.optimize import load_calibration
    from kiln.optimize import optimize as run_search

    settings = resolve(
        OptimizeSettings,
        {
            "max_accuracy_drop": max_accuracy_drop,
            "min_cosine": min_cosine,
            "time_budget_s": time_budget,
            "recipes": tuple(r.strip() for r in recipes.split(",") if r.strip()) if recipes else None,
            "batch_sizes": parse_ints(batch_sizes, "--batch-sizes"),
            "target_batch_size": target_batch_size,
            "objective": objective,
        },
        config_file=config,
    )
    # Checked before the search: a report path that cannot be written would otherwise fail after the chosen variant
    # was written, as an internal error.
    if report and report.is_dir():
        raise ConfigError(f'--report "{report}" is a directory; pass a file path, e.g. {report / "search.json"}')
    blocking = next((p for p in report.parents if p.exists() and not p.is_dir()), None) if report else None
    if blocking is not None:
        raise ConfigError(
            f'--report "{report}" cannot be written: "{blocking}" is a file, not a directory; pass a path in a '
            "directory, e.g. search.json"
        )
    parent = load(model, version)
    feeds = load_calibration(calibration) if calibration else None
    held_out = load_eval_npz(eval_data, parent.manifest.signature.input_names) if eval_data else None
    with progress_bar(f"optimize {parent.name} v{parent.version}") as update:
        result = run_search(parent, settings=settings, calibration=feeds, eval_data=held_out, progress=update)
    console.print(result.table())
    for fused in result.fusions():
        console.print(f"fusions fired: {fused}")
    if report:
        result.write_json(report)
        console.print(f"report: {report}", markup=False)
    if result.chosen is None:
        console.print(
            f"[yellow]kept {escape(parent.name)} v{parent.version}:[/] no candidate was both within budget and "
            + ("smaller" if settings.objective == "size" else "faster")
        )
        return
    best = result.best
    assert best is not None
    console.print(
        f"[green]chose[/] {best.recipe.name} -> {escape(result.chosen.name)} v{result.chosen.version} "
        f"({best.speedup:.2f}x at batch {settings.target_batch_size}); next: kiln bench "
        + escape(shlex.join([str(result.chosen.path.parent), *(["--eval-data", str(eval_data)] if eval_data else [])]))
    )
