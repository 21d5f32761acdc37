"""The HTML page of a load test: one table per server and two inline SVG plots, in the style of ``report.py``.

Plots: P50/P99 latency against achieved throughput (the latency-vs-throughput curve, with the P99 bar), and
achieved against offered rate (where a server saturates, its curve leaves the diagonal).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from kiln._utils import atomic_write_text
from kiln.bench.loadresults import STEP_COLUMNS, LoadReport, step_cells
from kiln.bench.report import _CSS, _figure, _inline, _svg

REPORT_FILE = "index.html"
JSON_FILE = "load.json"


def write_load_html(
    reports: Sequence[LoadReport], out_dir: Path, *, title: str = "Kiln load test", p99_ms: float = 200.0
) -> Path:
    """Write ``out_dir/index.html`` (tables and plots of one or more load tests) and ``out_dir/load.json``.

    ``p99_ms`` is the latency bar drawn on the curve and used for each server's "highest rate within" line.
    Returns the path of ``index.html``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"reports": [report.to_dict() for report in reports]}
    atomic_write_text(out_dir / JSON_FILE, json.dumps(document, indent=2) + "\n")
    svgs = [_latency_svg(reports, p99_ms), _saturation_svg(reports)]
    path = out_dir / REPORT_FILE
    atomic_write_text(path, _page(reports, title, p99_ms, svgs))
    return path


def read_load_json(path: Path) -> list[LoadReport]:
    """The reports a ``load.json`` holds."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [LoadReport.from_dict(report) for report in data["reports"]]


def _page(reports: Sequence[LoadReport], title: str, p99_ms: float, svgs: Sequence[str | None]) -> str:
    esc = html.escape
    header = "".join(f"<th>{h}</th>" for h in STEP_COLUMNS)
    sections = []
    for report in reports:
        rows = "\n".join(
            "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in step_cells(step)) + "</tr>" for step in report.steps
        )
        best = report.max_rate_within(p99_ms=p99_ms)
        within = f"{best:,.1f} requests/s" if best is not None else "none of the steps"
        context = "\n".join(
            f"{key}: {esc(_inline(value))}"
            for key, value in (
                ("payload", report.payload),
                ("settings", report.settings),
                ("versions", report.versions),
            )
        )
        sections.append(
            f"<h2>{esc(report.name)}</h2>"
            f"<p>{esc(report.created_at)}. Highest rate with P99 ≤ {p99_ms:g} ms and &lt; 1% errors: "
            f"<strong>{esc(within)}</strong>.</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>\n{rows}\n</tbody></table>"
            f"<pre>{context}</pre>"
        )
    plots = "".join(f"<figure>{svg}</figure>" for svg in svgs if svg)
    hardware = esc(_inline(reports[0].hardware)) if reports else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p>{esc(_how_measured(reports))} Percentiles are over successful responses; ok/s counts successful responses per
second.</p>
<div class="plots">{plots}</div>
{"".join(sections)}
<h2>Client hardware</h2>
<pre>{hardware}</pre>
</body></html>
"""


def _how_measured(reports: Sequence[LoadReport]) -> str:
    """How latency was measured: from the scheduled send (open loop) or from the send (closed loop)."""
    closed = [step.clients is not None for report in reports for step in report.steps]
    open_loop = (
        "In open loop (Poisson arrivals), latency is measured from each request's scheduled send time, so queueing "
        "in the client or the server shows up in the tail."
    )
    closed_loop = (
        "In closed loop (N clients, each sending again as soon as it has its answer), latency is measured from each "
        "send; the load adapts to the server, so a slow server is offered less."
    )
    if all(closed) and closed:
        return closed_loop
    return open_loop if not any(closed) else f"{open_loop} {closed_loop}"


def _latency_svg(reports: Sequence[LoadReport], p99_ms: float) -> str | None:
    if not any(step.ok for report in reports for step in report.steps):
        return None
    figure = _figure()
    axes = figure.add_subplot()
    for report in reports:
        points = [(x, p50, p99) for x, p50, _p90, p99 in report.curve() if p50 is not None and p99 is not None]
        if not points:
            continue
        (line,) = axes.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=f"{report.name} P99")
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=".",
            linestyle="--",
            color=line.get_color(),
            label=f"{report.name} P50",
        )
    axes.axhline(p99_ms, color="grey", linestyle=":", label=f"P99 bar {p99_ms:g} ms")
    axes.set_yscale("log")
    axes.set_xlabel("achieved throughput (successful requests/s)")
    axes.set_ylabel("latency from scheduled send (ms)")
    axes.set_title("Latency vs throughput")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _svg(figure)


def _saturation_svg(reports: Sequence[LoadReport]) -> str | None:
    open_steps = [[s for s in r.steps if s.mode == "open"] for r in reports]
    if not any(open_steps):
        return None
    figure = _figure()
    axes = figure.add_subplot()
    top = 0.0
    for report, steps in zip(reports, open_steps, strict=True):
        if not steps:
            continue
        ordered = sorted(steps, key=lambda s: s.offered_rps)
        axes.plot([s.offered_rps for s in ordered], [s.achieved_rps for s in ordered], marker="o", label=report.name)
        top = max(top, *(s.offered_rps for s in ordered))
    axes.plot([0, top], [0, top], linestyle=":", color="grey", label="achieved = offered")
    axes.set_xlabel("offered rate (requests/s)")
    axes.set_ylabel("achieved throughput (successful requests/s)")
    axes.set_title("Achieved vs offered rate")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _svg(figure)
