"""``kiln train``: a TOML config (or a built-in example's name) -> a trained, exported Kiln artifact."""

from __future__ import annotations

import contextlib
import logging
import shlex
from importlib import resources
from pathlib import Path

import typer

from kiln.cli._console import console, err_console
from kiln.errors import ConfigError, did_you_mean


def example_configs() -> dict[str, Path]:
    """The built-in example configs shipped with Kiln, by name (``digits`` -> ``.../examples/digits.toml``)."""
    folder = resources.files("kiln.train") / "examples"
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def _config_path(config: str) -> Path:
    path = Path(config)
    if path.suffix == ".toml" or path.exists():
        return path
    examples = example_configs()
    if config in examples:
        return examples[config]
    raise ConfigError(
        f'"{config}" is neither a TOML file nor a built-in example{did_you_mean(config, examples)}; '
        f"examples: {', '.join(sorted(examples))}",
        config=config,
    )


def train(
    config: str = typer.Argument(
        ...,
        help="A TOML file with a \\[train] table (and optionally \\[export]), or a built-in example: digits, iris ...",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in checkpoint_dir from its latest checkpoint."
    ),
    resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint file."),
    out: str = typer.Option(None, "--out", "-o", help="Model repository to write the trained artifact into."),
    name: str = typer.Option(None, "--name", "-n", help="Model name in the repository (default: the dataset)."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training data."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps (overrides epochs)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(None, "--batch-size", help="Rows per micro-batch."),
    seed: int = typer.Option(None, "--seed", help="Seed of model init, shuffling and dropout."),
    checkpoint_dir: str = typer.Option(None, "--checkpoint-dir", help="Where checkpoints go."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps (0: at exit)."),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="no, bf16 (CPU/GPU) or fp16 (GPU)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
    nproc: int = typer.Option(None, "--nproc", help="Data-parallel processes on this machine (torchrun; gloo on CPU)."),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db)."
    ),
    track: bool = typer.Option(None, "--track/--no-track", help="Log to MLflow (default on)."),
    export: bool = typer.Option(None, "--export/--no-export", help="Export the trained model (default on)."),
) -> None:
    """Train a model (checkpointed, resumable, tracked) and write it as a Kiln artifact."""
    from kiln.train import load_train_settings
    from kiln.train import train as run_training

    if resume and resume_from:
        raise ConfigError("pass either --resume (latest checkpoint) or --resume-from FILE, not both")
    settings, export_settings = load_train_settings(
        _config_path(config),
        {
            "resume": "latest" if resume else str(resume_from) if resume_from else None,
            "out": out,
            "name": name,
            "epochs": epochs,
            "max_steps": max_steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_every": checkpoint_every,
            "mixed_precision": mixed_precision,
            "device": device,
            "nproc": nproc,
            "tracking_uri": tracking_uri,
            "track": track,
            "export": export,
        },
    )
    if settings.track and logging.getLogger("kiln").getEffectiveLevel() > logging.INFO:
        # MLflow sets up its own logger on import and logs its database migrations at INFO; shown only with -v.
        with contextlib.suppress(ImportError):
            import mlflow  # noqa: F401

        logging.getLogger("mlflow").setLevel(logging.WARNING)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]train {task.fields[run]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} samples/s{task.fields[tokens]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("train", total=None, run=settings.run_name, loss="-", rate="-", tokens="")

        def on_step(stats: object) -> None:
            from kiln.train import StepStats

            assert isinstance(stats, StepStats)
            bar.update(
                task,
                completed=stats.step,
                total=stats.total_steps,
                loss=f"{stats.loss:.4f}",
                rate=f"{stats.samples_per_s:,.0f}",
                tokens=f", {stats.tokens_per_s:,.0f} tokens/s" if stats.tokens else "",
            )

        result = run_training(settings, export_settings=export_settings, on_step=on_step)
    console.print(result.table())
    if result.artifact is not None:
        console.print(f"next: kiln optimize {shlex.quote(str(result.artifact.path.parent))}", markup=False)
