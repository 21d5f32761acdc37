"""``kiln quickstart`` (``make demo``): the whole road on embedded defaults, no flags, no network.

1. all-MiniLM-L6-v2 from the bundled package -> export -> optimize (guarded search) -> bench.
2. A scikit-learn MLP trained on the bundled digits -> export -> optimize with the accuracy guard -> bench.
3. ``kiln train``: a small CNN on digits with Kiln's trainer, then a smaller MLP student distilled from it (the
   teacher runs in ONNX Runtime); both are exported, optimized with the accuracy guard and benchmarked.
4. ``kiln serve`` on that repository, in its own process: real English sentences at a few Poisson rates from
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
from kiln.errors import ConfigError, KilnError, did_you_mean
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


def train_road(repo: Path, reports: Path, stage: Stage, *, fast: bool = False) -> list[RoadResult]:
    """Train a CNN teacher and distil an MLP student on digits; export, optimize and bench both."""
    from kiln.train import TrainSettings, train

    checkpoints = reports / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)
    common: dict[str, Any] = {"dataset": "digits", "out": str(repo), "track": False, "batch_size": 32}
    teacher = train(
        TrainSettings(
            name="digits-cnn",
            model="cnn",
            hidden_sizes=(16, 32),
            epochs=6 if fast else 15,
            lr=3e-3,
            schedule="cosine",
            checkpoint_dir=str(checkpoints / "digits-cnn"),
            **common,
        ),
        on_step=_step_progress(stage("train digits-cnn")),
    )
    student = train(
        TrainSettings(
            name="digits-student",
            model="mlp",
            hidden_sizes=(16,),
            epochs=12 if fast else 30,
            lr=5e-3,
            teacher=str(repo / "digits-cnn"),
            distill_temperature=4.0,
            distill_alpha=0.7,
            checkpoint_dir=str(checkpoints / "digits-student"),
            **common,
        ),
        on_step=_step_progress(stage("distil digits-student")),
    )
    results = []
    for trained in (teacher, student):
        assert trained.artifact is not None
        name = trained.artifact.name
        search = optimize(
            trained.artifact,
            settings=OptimizeSettings(measure_repeats=3 if fast else 5),
            progress=stage(f"optimize {name}"),
        )
        compared = [trained.artifact] + ([search.chosen] if search.chosen else [])
        settings = BenchSettings(batch_sizes=(1, 8, 32), warmup_runs=2, runs=5 if fast else 15, samples=256)
        report = bench(compared, settings=settings, report_dir=reports / name, progress=stage(f"bench {name}"))
        accuracy = trained.metrics.get("test_accuracy", 0.0)
        notes = [f"trained {trained.steps} steps, test accuracy {accuracy:.4f}"]
        results.append(RoadResult(name, trained.artifact, search, report, reports / name / "index.html", notes))
    return results


def _step_progress(progress: Progress) -> Callable[[Any], None]:
    def on_step(stats: Any) -> None:
        progress(f"step {stats.step}/{stats.total_steps} loss {stats.loss:.3f}", stats.step / max(stats.total_steps, 1))

    return on_step


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
    models: tuple[str, ...] = ("minilm", "digits", "train"),
) -> list[RoadResult]:
    """Run the demo road for each model; ``repo`` is created fresh (an earlier demo's repo is replaced).

    ``serve_road`` is the next step: the CLI runs it on the same repository.
    """
    stage = stage or (lambda _title: lambda _msg, _frac: None)
    if any((repo / name).is_dir() for name in ("minilm", "digits", "digits-cnn", "digits-student")):
        shutil.rmtree(repo)
    reports.mkdir(parents=True, exist_ok=True)
    roads: dict[str, Callable[..., RoadResult | list[RoadResult]]] = {
        "minilm": minilm_road,
        "digits": digits_road,
        "train": train_road,
    }
    results: list[RoadResult] = []
    for name in models:
        if name not in roads:
            raise ConfigError(
                f'demo road "{name}" is unknown{did_you_mean(name, roads)}; choose from {", ".join(roads)}'
            )
        outcome = roads[name](repo, reports, stage, fast=fast)
        results.extend(outcome if isinstance(outcome, list) else [outcome])
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
