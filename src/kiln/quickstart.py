"""``kiln quickstart`` (``make demo``): the whole road on embedded defaults, no flags, no network.

1. all-MiniLM-L6-v2 from the bundled package -> export -> optimize (guarded search) -> bench.
2. A scikit-learn MLP trained on the bundled digits -> export -> optimize with the accuracy guard -> bench.
3. ``kiln serve`` on that repository, in its own process: real English sentences at a few Poisson rates from
   the load generator, then SIGTERM, a drain, and exit code 0.

Writes the repository (``kiln-repo/``) and the reports (``kiln-report/index.html`` linking one page per model).
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifact import Artifact
from kiln.bench import BenchReport, LoadReport, LoadSettings, bench, load_test
from kiln.config import BenchSettings, OptimizeSettings
from kiln.errors import KilnError
from kiln.export import bundled_minilm_path, export
from kiln.optimize import OptimizeResult, optimize

Progress = Callable[[str, float], None]
Stage = Callable[[str], Progress]


@dataclass
class RoadResult:
    """One model's trip: the exported artifact, the search, and the bench."""

    name: str
    exported: Artifact
    search: OptimizeResult
    report: BenchReport
    report_path: Path
    notes: list[str] = field(default_factory=list)


def minilm_road(repo: Path, reports: Path, stage: Stage, *, fast: bool = False) -> RoadResult:
    exported = export(bundled_minilm_path(), out=repo, name="minilm")
    search = optimize(
        exported,
        settings=OptimizeSettings(eval_samples=128 if fast else 256, measure_repeats=2 if fast else 3),
        progress=stage("optimize minilm"),
    )
    compared = [exported] + ([search.chosen] if search.chosen else [])
    settings = BenchSettings(
        batch_sizes=(1, 8, 32), warmup_runs=1 if fast else 2, runs=3 if fast else 7, samples=64 if fast else 128
    )
    report = bench(compared, settings=settings, report_dir=reports / "minilm", progress=stage("bench minilm"))
    return RoadResult("minilm", exported, search, report, reports / "minilm" / "index.html")


def digits_road(repo: Path, reports: Path, stage: Stage, *, fast: bool = False) -> RoadResult:
    from sklearn.neural_network import MLPClassifier

    from kiln.data import bundled_dataset

    data = bundled_dataset("digits")
    # NOTE: scaled to [0, 1] inside a pipeline so the exported graph carries the scaling too.
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    model = make_pipeline(
        MinMaxScaler(), MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=300, random_state=0)
    ).fit(data.x_train, data.y_train)
    exported = export(
        model,
        out=repo,
        name="digits",
        example_inputs=data.x_test,
        eval_data=(data.x_test, data.y_test),
        labels=data.target_names,
    )
    search = optimize(
        exported, settings=OptimizeSettings(measure_repeats=3 if fast else 5), progress=stage("optimize digits")
    )
    compared = [exported] + ([search.chosen] if search.chosen else [])
    settings = BenchSettings(batch_sizes=(1, 8, 32), warmup_runs=2, runs=5 if fast else 15, samples=256)
    report = bench(compared, settings=settings, report_dir=reports / "digits", progress=stage("bench digits"))
    return RoadResult("digits", exported, search, report, reports / "digits" / "index.html")


@dataclass
class ServeResult:
    """The demo's serving step: the server's start-to-ready time, the load it took, and how it stopped."""

    ready_s: float
    load: LoadReport
    exit_code: int
    report_path: Path


def serve_road(repo: Path, reports: Path, stage: Stage, *, fast: bool = False, model: str = "minilm") -> ServeResult:
    """Serve ``repo`` in a child process and load ``model`` at a few Poisson rates; the server must drain to 0."""
    from kiln.serve import ServerProcess

    settings = LoadSettings(rates=(5.0, 20.0) if fast else (10.0, 25.0, 50.0), duration_s=3.0 if fast else 6.0)
    with ServerProcess(repo, "--models", model) as server:
        report = load_test(
            server.url,
            model,
            settings=settings,
            label=f"kiln serve {model}",
            report_dir=reports / "serve",
            progress=stage(f"serve {model}"),
        )
        exit_code = server.stop()
    if exit_code != 0:
        raise KilnError(f"kiln serve exited with code {exit_code} after SIGTERM; its log:\n{server.log}")
    assert server.ready_s is not None
    return ServeResult(server.ready_s, report, exit_code, reports / "serve" / "index.html")


def quickstart(
    repo: Path = Path("kiln-repo"),
    reports: Path = Path("kiln-report"),
    *,
    stage: Stage | None = None,
    fast: bool = False,
    models: tuple[str, ...] = ("minilm", "digits"),
) -> list[RoadResult]:
    """Run the demo road for each model; ``repo`` is created fresh (an earlier demo's repo is replaced).

    ``serve_road`` is the next step: the CLI runs it on the same repository.
    """
    stage = stage or (lambda _title: lambda _msg, _frac: None)
    if (repo / "minilm").is_dir() or (repo / "digits").is_dir():
        shutil.rmtree(repo)
    reports.mkdir(parents=True, exist_ok=True)
    roads = {"minilm": minilm_road, "digits": digits_road}
    results = [roads[name](repo, reports, stage, fast=fast) for name in models]
    (reports / "index.html").write_text(_index_html(results), encoding="utf-8")
    return results


def summary_rows(results: list[RoadResult]) -> list[dict[str, Any]]:
    """One line per model: what was chosen, how much faster, at what fidelity."""
    rows = []
    for result in results:
        best = result.search.best
        rows.append(
            {
                "model": result.name,
                "exported": f"v{result.exported.version}",
                "chosen": f"v{result.search.chosen.version} {best.recipe.name}"
                if result.search.chosen and best
                else "kept fp32",
                "speedup": f"{best.speedup:.2f}x" if best else "-",
                "fidelity": _fidelity(best.figures) if best else "-",
                "rejected": sum(c.status == "rejected" for c in result.search.candidates),
                "report": str(result.report_path),
            }
        )
    return rows


def _fidelity(figures: dict[str, float]) -> str:
    if "mean_cosine" in figures:
        return f"cos {figures['mean_cosine']:.4f}"
    if "accuracy" in figures:
        return f"acc {figures['accuracy']:.4f}"
    return f"{figures.get('score', 0.0):.4f}"


def _index_html(results: list[RoadResult]) -> str:
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(str(v))}</td>" for k, v in row.items() if k != "report")
        + f'<td><a href="{html.escape(Path(row["report"]).parent.name)}/index.html">report</a></td></tr>'
        for row in summary_rows(results)
    )
    searches = "".join(
        f"<h2>{html.escape(r.name)}: optimize search</h2><table><tr><th>recipe</th><th>status</th><th>speedup</th>"
        "<th>fidelity</th><th>reason</th></tr>"
        + "".join(
            f"<tr><td>{html.escape(c.recipe.name)}</td><td>{c.status}</td><td>{c.speedup:.2f}x</td>"
            f"<td>{html.escape(_fidelity(c.figures)) if c.figures else '-'}</td><td>{html.escape(c.reason)}</td></tr>"
            for c in r.search.candidates
        )
        + "</table>"
        for r in results
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Kiln quickstart</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>"
        "<h1>Kiln quickstart</h1><table><tr><th>model</th><th>exported</th><th>chosen</th><th>speedup</th>"
        f"<th>fidelity</th><th>rejected</th><th>bench</th></tr>{rows}</table>{searches}</body></html>"
    )
