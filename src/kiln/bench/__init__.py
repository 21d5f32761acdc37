"""``kiln bench``: compare engines and variants of one model in-process, and report the figures.

Example:
    >>> from kiln.artifact import load
    >>> report = bench([load("kiln-repo/minilm/1"), load("kiln-repo/minilm/2")],
    ...                report_dir=Path("bench-report"))  # doctest: +SKIP
    >>> rich.print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

from kiln.bench.inprocess import bench
from kiln.bench.report import latency_pareto_front, write_html
from kiln.bench.results import BenchReport, BenchRow, CorpusThroughput
from kiln.config import BenchSettings

__all__ = [
    "BenchReport",
    "BenchRow",
    "BenchSettings",
    "CorpusThroughput",
    "bench",
    "latency_pareto_front",
    "write_html",
]
