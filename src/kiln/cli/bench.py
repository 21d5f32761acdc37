"""``kiln bench``: engines and variants of one model side by side, in-process; or, with ``--url``, load against
any KServe V2 HTTP server."""

from __future__ import annotations

from pathlib import Path

import typer

from kiln.cli._console import console, parse_ints, progress_bar
from kiln.errors import ConfigError

DEFAULT_REPORT_DIR = Path("kiln-report")
DEFAULT_LOAD_REPORT_DIR = Path("kiln-report/load")


def bench(
    models: list[Path] = typer.Argument(
        None,
        help="Model directories (every version is compared) or version directories; the first is the reference. "
        "Leave out with --url.",
        show_default=False,
    ),
    batch_sizes: str = typer.Option(None, "--batch-sizes", help="Batch sizes, e.g. 1,8,32."),
    runs: int = typer.Option(None, "--runs", help="Timed runs per engine and batch size (after warm-up)."),
    warmup: int = typer.Option(None, "--warmup", help="Warm-up runs per engine and batch size."),
    samples: int = typer.Option(None, "--samples", help="Held-out rows/texts used for fidelity and throughput."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Leave out the PyTorch eager source model."),
    eval_data: Path = typer.Option(
        None,
        "--eval-data",
        help=".npz of held-out inputs (named like the model inputs) and optional labels, for a model exported "
        "without any.",
    ),
    report_dir: Path = typer.Option(
        None,
        "--report-dir",
        help="Where index.html and the JSON go \\[default: kiln-report; with --url: kiln-report/load].",
    ),
    config: Path = typer.Option(None, "--config", help="TOML config file (\\[bench] table; \\[load] with --url)."),
    url: str = typer.Option(None, "--url", help="Load a KServe V2 HTTP server instead, e.g. http://127.0.0.1:8000."),
    model: str = typer.Option(None, "--model", help="With --url: the model to load."),
    model_version: str = typer.Option(None, "--model-version", help="With --url: a version (default: the server's)."),
    rates: str = typer.Option(None, "--rates", help="With --url: Poisson rates, requests/s, one step each [10,20,40]."),
    duration_s: float = typer.Option(None, "--duration-s", help="With --url: seconds per step [10]."),
    max_requests: int = typer.Option(None, "--max-requests", help="With --url: at most this many requests per step."),
    concurrency: int = typer.Option(
        None, "--concurrency", help="With --url: cap on requests in flight; those over it count as errors [64]."
    ),
    closed_loop: str = typer.Option(
        None, "--closed-loop", help="With --url: closed loop with N concurrent clients (or a list, e.g. 1,4,16)."
    ),
    binary: bool = typer.Option(None, "--binary/--json", help="With --url: the V2 binary tensor extension or JSON."),
    texts_per_request: int = typer.Option(None, "--texts-per-request", help="With --url: texts per request [1]."),
    rows_per_request: int = typer.Option(None, "--rows-per-request", help="With --url: tensor rows per request [1]."),
    api_key: str = typer.Option(
        None, "--api-key", help="With --url: a server with API keys; sent as `Authorization: Bearer KEY`."
    ),
) -> None:
    """Median and P99 latency, throughput, size and fidelity per engine and batch size; HTML report with plots.

    With --url: Poisson load (or --closed-loop) against a KServe V2 server, step by step: P50/P90/P99 latency,
    throughput, errors by code, and the latency-vs-throughput curve.
    """
    if url is not None:
        if models:
            raise ConfigError(
                f"pass model directories ({', '.join(map(str, models))}) or --url, not both; --url loads a server"
            )
        _refuse_flags(
            {
                "--batch-sizes": batch_sizes,
                "--runs": runs,
                "--warmup": warmup,
                "--samples": samples,
                "--no-torch": no_torch or None,
                "--eval-data": eval_data,
            },
            "to model directories compared in-process, not to --url (a server under load)",
        )
        if closed_loop is not None:
            _refuse_flags(
                {"--rates": rates, "--concurrency": concurrency},
                "to open-loop (Poisson) steps, not to --closed-loop (a fixed number of clients)",
            )
        _bench_url(
            url,
            model,
            model_version,
            {
                "rates": _parse_floats(rates, "--rates"),
                "duration_s": duration_s,
                "max_requests": max_requests,
                "concurrency": concurrency,
                "closed_loop": parse_ints(closed_loop, "--closed-loop"),
                "binary": binary,
                "texts_per_request": texts_per_request,
                "rows_per_request": rows_per_request,
            },
            _load_report_dir(report_dir, config),
            config,
            api_key,
        )
        return
    if not models:
        raise ConfigError(
            "kiln bench needs model directories to compare in-process (e.g. kiln bench kiln-repo/minilm), "
            "or --url URL --model NAME to load a server"
        )
    _refuse_flags(
        {
            "--model": model,
            "--model-version": model_version,
            "--rates": rates,
            "--duration-s": duration_s,
            "--max-requests": max_requests,
            "--concurrency": concurrency,
            "--closed-loop": closed_loop,
            "--binary" if binary else "--json": binary,
            "--texts-per-request": texts_per_request,
            "--rows-per-request": rows_per_request,
            "--api-key": api_key,
        },
        "only with --url (a server under load), not to model directories compared in-process",
    )
    _bench_in_process(models, batch_sizes, runs, warmup, samples, no_torch, report_dir, config, eval_data)


def _refuse_flags(flags: dict[str, object], applies: str) -> None:
    """A ConfigError naming the flags given (not None) that do not apply here, rather than ignoring them."""
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        one = len(given) == 1
        raise ConfigError(
            f"{', '.join(given)} {'applies' if one else 'apply'} {applies}; leave {'it' if one else 'them'} out",
            flags=given,
        )


def _load_report_dir(report_dir: Path | None, config: Path | None) -> Path:
    """--report-dir > KILN_REPORT_DIR > [bench] report_dir > kiln-report/load, as in-process (it was the flag or
    the default only)."""
    from kiln.config import BenchSettings, resolve

    configured = resolve(BenchSettings, {"report_dir": str(report_dir) if report_dir else None}, config_file=config)
    return Path(configured.report_dir) if configured.report_dir else DEFAULT_LOAD_REPORT_DIR


def _bench_in_process(
    models: list[Path],
    batch_sizes: str | None,
    runs: int | None,
    warmup: int | None,
    samples: int | None,
    no_torch: bool,
    report_dir: Path | None,
    config: Path | None,
    eval_data: Path | None,
) -> None:
    from kiln.artifact import Artifact, load, versions
    from kiln.bench import bench as run_bench
    from kiln.config import BenchSettings, resolve
    from kiln.data import load_eval_npz

    settings = resolve(
        BenchSettings,
        {
            "batch_sizes": parse_ints(batch_sizes, "--batch-sizes"),
            "runs": runs,
            "warmup_runs": warmup,
            "samples": samples,
            "include_torch": False if no_torch else None,
            "report_dir": str(report_dir) if report_dir is not None else None,
        },
        config_file=config,
    )
    # --report-dir > KILN_REPORT_DIR > [bench] report_dir > the CLI's default (the library writes no report)
    report_dir = Path(settings.report_dir) if settings.report_dir else DEFAULT_REPORT_DIR
    artifacts: list[Artifact] = []
    for path in models:
        found = versions(path)
        artifacts.extend([load(path, v) for v in found] if found else [load(path)])
    held_out = load_eval_npz(eval_data, artifacts[0].manifest.signature.input_names) if eval_data else None
    with progress_bar("bench") as update:
        report = run_bench(artifacts, settings=settings, report_dir=report_dir, progress=update, eval_data=held_out)
    console.print(report.table())
    console.print(f"report: {report_dir / 'index.html'}  json: {report_dir / 'bench.json'}", markup=False)


def _bench_url(
    url: str,
    model: str | None,
    version: str | None,
    overrides: dict[str, object],
    report_dir: Path,
    config: Path | None,
    api_key: str | None,
) -> None:
    from kiln.bench import LoadSettings, load_test
    from kiln.config import resolve

    if not model:
        raise ConfigError(f"--url {url} needs --model NAME: the model to load on that server (see GET /v2/models)")
    settings = resolve(LoadSettings, overrides, config_file=config, section="load")
    with progress_bar("load") as update:
        report = load_test(
            url, model, version=version, settings=settings, report_dir=report_dir, progress=update, api_key=api_key
        )
    console.print(report.table())
    best = report.max_rate_within(p99_ms=200.0, max_error_rate=0.01)
    within = f"{best:,.1f} requests/s" if best is not None else "none of the steps"
    console.print(f"highest rate with P99 <= 200 ms and < 1% errors: {within}")
    console.print(f"report: {report_dir / 'index.html'}  json: {report_dir / 'load.json'}", markup=False)


def _parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"10,20,40"`` -> ``(10.0, 20.0, 40.0)``; a clear error for anything else."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise ConfigError(f'{option} "{text}" must be a comma-separated list of positive numbers, e.g. 10,20,40')
    return values
