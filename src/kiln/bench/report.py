"""A self-contained HTML report: the table and two plots as inline SVG (no network, no JavaScript)."""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln._utils import atomic_write_text
from kiln.bench.results import COLUMNS, BenchReport, primary_fidelity
from kiln.errors import ConfigError
from kiln.fidelity import pareto_front

REPORT_FILE = "index.html"
JSON_FILE = "bench.json"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child, td:last-child, th:last-child { text-align: left; }
.plots svg { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
"""


def latency_pareto_front(latency_ms: Sequence[float], fidelity: Sequence[float]) -> list[bool]:
    """Which points are on the speed/fidelity Pareto front (lower latency and higher fidelity are better).

    A point is off the front when another is at least as fast and at least as faithful, and strictly better on
    one of the two; the same rule as optimize's search (:func:`kiln.fidelity.pareto_front`), so both agree.

    Example:
        >>> latency_pareto_front([1.0, 2.0, 3.0], [0.90, 0.99, 0.95])
        [True, True, False]
    """
    if len(latency_ms) != len(fidelity):
        raise ValueError(f"{len(latency_ms)} latencies but {len(fidelity)} fidelity values; pass one of each per point")
    return pareto_front([(float(f), -float(lat)) for lat, f in zip(latency_ms, fidelity, strict=True)])


def write_html(report: BenchReport, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` (table + throughput and fidelity-vs-latency plots) and ``out_dir/bench.json``.

    Returns the path of ``index.html``.
    """
    out_dir = Path(out_dir)
    check_report_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _report_dir_error(out_dir, exc.strerror or str(exc)) from exc
    report.write_json(out_dir / JSON_FILE)
    page = _page(report, [_throughput_svg(report), _fidelity_svg(report)])
    path = out_dir / REPORT_FILE
    atomic_write_text(path, page)
    return path


def check_report_dir(out_dir: Path) -> None:
    """Refuse a report directory that cannot be written: it, or the nearest existing folder above it, is a file
    or is not writable.

    Raises:
        ConfigError: naming the directory and what is wrong with it.
    """
    existing = Path(out_dir).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == Path(out_dir).absolute() else f'is inside "{existing}", which is a file'
        raise _report_dir_error(Path(out_dir), what)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _report_dir_error(Path(out_dir), f'cannot be written ("{existing}" is not writable)')


def _report_dir_error(out_dir: Path, what: str) -> ConfigError:
    return ConfigError(
        f'report directory "{out_dir}" {what}; pass --report-dir (or KILN_REPORT_DIR) a directory that can be '
        "written (it is created when missing)",
        report_dir=str(out_dir),
    )


def _page(report: BenchReport, svgs: Sequence[str | None]) -> str:
    esc = html.escape
    body = "\n".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row.cells()) + "</tr>" for row in report.rows)
    corpus = ""
    if report.corpus:
        items = "".join(
            f"<li>{esc(c.engine)}: {c.sentences_per_s:,.1f} sentences/s ({c.texts} texts, batch {c.batch_size})</li>"
            for c in report.corpus
        )
        corpus = f"<h2>Corpus throughput (length-sorted batching)</h2><ul>{items}</ul>"
    plots = "".join(f"<figure>{svg}</figure>" for svg in svgs if svg)
    context = "\n".join(
        f"{esc(title)}: {esc(_inline(value))}"
        for title, value in (
            ("hardware", report.hardware),
            ("versions", report.versions),
            ("settings", report.settings),
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln bench: {esc(report.model)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Kiln bench: {esc(report.model)} ({esc(report.task)})</h1>
<p>{esc(report.created_at)}. Latency of one request of <em>batch</em> rows, median and P99 over the timed runs;
rows/s = batch / median. Fidelity against the first engine on the whole evaluation set.</p>
<table><thead><tr>{"".join(f"<th>{h}</th>" for h in COLUMNS)}</tr></thead>
<tbody>
{body}
</tbody></table>
{corpus}
<div class="plots">{plots}</div>
<h2>Context</h2>
<pre>{context}</pre>
</body></html>
"""


def _inline(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _figure() -> Any:
    # NOTE: the object-oriented API with an explicit Agg canvas touches no global pyplot state or backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _svg(figure: Any) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kiln"}):
        figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML declaration and doctype: the SVG sits inside HTML


def _throughput_svg(report: BenchReport) -> str:
    figure = _figure()
    axes = figure.add_subplot()
    for engine in report.engines:
        rows = sorted((r for r in report.rows if r.engine == engine), key=lambda r: r.batch_size)
        axes.plot([r.batch_size for r in rows], [r.rows_per_s for r in rows], marker="o", label=engine)
    if len(report.batch_sizes) > 1:
        axes.set_xscale("log", base=2)
    axes.set_xticks(report.batch_sizes, [str(b) for b in report.batch_sizes])
    axes.set_xlabel("batch size (rows per request)")
    axes.set_ylabel("throughput (rows/s)")
    axes.set_title("Throughput vs batch size")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _svg(figure)


def _fidelity_svg(report: BenchReport) -> str | None:
    batch = max(report.batch_sizes)
    points = []
    for engine in report.engines:
        row = report.row(engine, batch)
        primary = primary_fidelity(row.fidelity)
        if primary is not None:
            points.append((engine, row.p50_ms, primary[1], primary[0]))
    if not points:
        return None
    on_front = latency_pareto_front([p[1] for p in points], [p[2] for p in points])
    figure = _figure()
    axes = figure.add_subplot()
    for (engine, latency, value, _label), front in zip(points, on_front, strict=True):
        axes.scatter([latency], [value], s=60, marker="o" if front else "x", zorder=3)
        axes.annotate(engine, (latency, value), textcoords="offset points", xytext=(6, 4), fontsize="small")
    front_points = sorted((p[1], p[2]) for p, front in zip(points, on_front, strict=True) if front)
    axes.plot(
        [p[0] for p in front_points],
        [p[1] for p in front_points],
        linestyle="--",
        color="grey",
        label="Pareto front",
        zorder=2,
    )
    axes.margins(x=0.2, y=0.1)  # room for the engine names beside the points
    axes.set_xlabel(f"p50 latency at batch {batch} (ms)")
    axes.set_ylabel(points[0][3])
    axes.set_title("Fidelity vs latency (up and left is better)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _svg(figure)
