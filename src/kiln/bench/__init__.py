"""``kiln bench``: compare engines and variants of one model in-process, or load a V2 server; report the figures.

Example:
    >>> from kiln.artifact import load
    >>> report = bench([load("kiln-repo/minilm/1"), load("kiln-repo/minilm/2")],
    ...                report_dir=Path("bench-report"))  # doctest: +SKIP
    >>> rich.print(report.table())  # doctest: +SKIP
    >>> load = load_test("http://127.0.0.1:8000", "minilm", settings=LoadSettings(rates=(20, 40)))  # doctest: +SKIP
    >>> load.max_rate_within(p99_ms=200, max_error_rate=0.01)  # doctest: +SKIP
    40.0
"""

from __future__ import annotations

from kiln.bench.inprocess import bench
from kiln.bench.load import LoadSettings, load_test, search_max_rate
from kiln.bench.loadclient import LoadClient
from kiln.bench.loadreport import write_load_html
from kiln.bench.loadresults import LoadReport
from kiln.bench.report import latency_pareto_front, write_html
from kiln.bench.results import BenchReport, BenchRow, CorpusThroughput
from kiln.config import BenchSettings

__all__ = [
    "BenchReport",
    "BenchRow",
    "BenchSettings",
    "CorpusThroughput",
    "LoadClient",
    "LoadReport",
    "LoadSettings",
    "bench",
    "latency_pareto_front",
    "load_test",
    "search_max_rate",
    "write_html",
    "write_load_html",
]
