"""The HTML report: self-contained, with the table and two inline SVG plots."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.bench import BenchReport, BenchRow, CorpusThroughput, write_html


def hand_made_report() -> BenchReport:
    def row(engine: str, batch: int, p50: float, fidelity: dict[str, float]) -> BenchRow:
        return BenchRow(engine, batch, p50, p50 * 1.2, batch / (p50 / 1e3), 1000, fidelity)

    fp32, int8, slow = {"mean_cosine": 1.0}, {"mean_cosine": 0.99}, {"mean_cosine": 0.98}
    return BenchReport(
        model="minilm v1",
        task="embedding",
        rows=[
            row("minilm v1 (fp32)", 1, 2.0, fp32),
            row("minilm v2 (int8)", 1, 1.0, int8),
            row("<odd & name>", 1, 3.0, slow),
            row("minilm v1 (fp32)", 32, 40.0, fp32),
            row("minilm v2 (int8)", 32, 20.0, int8),
            row("<odd & name>", 32, 50.0, slow),
        ],
        corpus=[CorpusThroughput("minilm v2 (int8)", 32, 256, 900.0)],
        hardware={"cpu": "test"},
        versions={"onnxruntime": "1.0"},
        settings={"batch_sizes": [1, 32]},
        created_at="2025-01-01T00:00:00+00:00",
    )


def test_write_html_is_self_contained_with_two_svg_plots(tmp_path: Path) -> None:
    report = hand_made_report()
    path = write_html(report, tmp_path / "out")
    assert path == tmp_path / "out" / "index.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("<svg") == 2
    assert "<?xml" not in page and "<script" not in page and "<link" not in page
    assert "Throughput vs batch size" in page and "Pareto front" in page
    assert "&lt;odd &amp; name&gt;" in page and "<odd & name>" not in page  # escaped in table and plots
    assert "900.0 sentences/s" in page
    assert BenchReport.from_dict(json.loads((tmp_path / "out" / "bench.json").read_text(encoding="utf-8"))) == report


def test_write_html_without_fidelity_draws_only_throughput(tmp_path: Path) -> None:
    report = hand_made_report()
    report.rows = [
        BenchRow(r.engine, r.batch_size, r.p50_ms, r.p99_ms, r.rows_per_s, r.size_bytes) for r in report.rows
    ]
    page = write_html(report, tmp_path).read_text(encoding="utf-8")
    assert page.count("<svg") == 1


def test_the_terminal_table_prints_names_with_brackets_as_they_are() -> None:
    import io

    from rich.console import Console

    report = hand_made_report()
    report.model = "m[red]x v1"
    report.rows = [BenchRow("m[v2] v1 (fp32)", 1, 1.0, 1.2, 1000.0, 1000, {"mean_cosine": 1.0})]
    report.corpus = [CorpusThroughput("m[v2] v1 (fp32)", 1, 8, 90.0)]
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(report.table())
    text = console.export_text()
    # rich read "[red]" and "[v2]" as markup: the names printed as "mx" and "m"
    assert "m[red]x v1 (embedding)" in text
    assert text.count("m[v2] v1 (fp32)") == 2  # the row and the corpus caption
