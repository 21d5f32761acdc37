"""``kiln bench``: engines and variants of one model side by side, in-process."""

from __future__ import annotations

from pathlib import Path

import typer

from kiln.cli._console import console, parse_ints, progress_bar


def bench(
    models: list[Path] = typer.Argument(
        ...,
        help="Model directories (every version is compared) or version directories; the first is the reference.",
    ),
    batch_sizes: str = typer.Option(None, "--batch-sizes", help="Batch sizes, e.g. 1,8,32."),
    runs: int = typer.Option(None, "--runs", help="Timed runs per engine and batch size (after warm-up)."),
    warmup: int = typer.Option(None, "--warmup", help="Warm-up runs per engine and batch size."),
    samples: int = typer.Option(None, "--samples", help="Held-out rows/texts used for fidelity and throughput."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Leave out the PyTorch eager source model."),
    report_dir: Path = typer.Option(Path("kiln-report"), "--report-dir", help="Where index.html and bench.json go."),
    config: Path = typer.Option(None, "--config", help="TOML config file ([bench] table)."),
) -> None:
    """Median and P99 latency, throughput, size and fidelity per engine and batch size; HTML report with plots."""
    from kiln.artifact import Artifact, load, versions
    from kiln.bench import bench as run_bench
    from kiln.config import BenchSettings, resolve

    settings = resolve(
        BenchSettings,
        {
            "batch_sizes": parse_ints(batch_sizes, "--batch-sizes"),
            "runs": runs,
            "warmup_runs": warmup,
            "samples": samples,
            "include_torch": False if no_torch else None,
        },
        config_file=config,
    )
    artifacts: list[Artifact] = []
    for path in models:
        found = versions(path)
        artifacts.extend([load(path, v) for v in found] if found else [load(path)])
    with progress_bar("bench") as update:
        report = run_bench(artifacts, settings=settings, report_dir=report_dir, progress=update)
    console.print(report.table())
    console.print(f"report: {report_dir / 'index.html'}  json: {report_dir / 'bench.json'}")
