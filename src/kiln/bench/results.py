"""What an in-process benchmark found: one row per engine and batch size, plus the context to trust it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln._utils import atomic_write_text, human_bytes

if TYPE_CHECKING:
    from rich.table import Table

# Higher-is-better fidelity figures, in the order a report prefers them.
_PRIMARY_FIDELITY = (("mean_cosine", "mean cosine to reference"), ("accuracy", "accuracy"), ("r2", "R²"))


@dataclass(frozen=True)
class BenchRow:
    """One engine at one batch size: latency of a ``batch_size``-row request, and how faithful the engine is.

    ``fidelity`` is measured once per engine on the whole evaluation set, so it repeats across batch sizes.
    """

    engine: str
    batch_size: int
    p50_ms: float
    p99_ms: float
    rows_per_s: float  # batch_size / median latency
    size_bytes: int
    fidelity: dict[str, float] = field(default_factory=dict)

    def cells(self) -> tuple[str, ...]:
        """The row as text, in the order of :data:`COLUMNS` (the terminal table and the HTML page both show it)."""
        return (
            self.engine,
            str(self.batch_size),
            f"{self.p50_ms:.3f}",
            f"{self.p99_ms:.3f}",
            f"{self.rows_per_s:,.1f}",
            human_bytes(self.size_bytes),
            fidelity_text(self.fidelity),
        )


COLUMNS = ("engine", "batch", "p50 ms", "p99 ms", "rows/s", "size", "fidelity")


@dataclass(frozen=True)
class CorpusThroughput:
    """Sentences per second encoding the whole evaluation corpus with Kiln's length-sorted batching."""

    engine: str
    batch_size: int
    texts: int
    sentences_per_s: float  # median of a few passes


@dataclass
class BenchReport:
    """The result of :func:`kiln.bench.bench`: figures, plus the hardware, versions and settings they hold for.

    Example:
        >>> report = bench([load("kiln-repo/digits/1"), load("kiln-repo/digits/2")])  # doctest: +SKIP
        >>> rich.print(report.table())  # doctest: +SKIP
        >>> report.write_json(Path("bench.json"))  # doctest: +SKIP
    """

    model: str
    task: str
    rows: list[BenchRow]
    corpus: list[CorpusThroughput] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def engines(self) -> list[str]:
        """Engine names in the order they were benchmarked."""
        return list(dict.fromkeys(row.engine for row in self.rows))

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({row.batch_size for row in self.rows})

    def row(self, engine: str, batch_size: int) -> BenchRow:
        for row in self.rows:
            if row.engine == engine and row.batch_size == batch_size:
                return row
        raise KeyError(f"no row for engine {engine!r} at batch size {batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "created_at": self.created_at,
            "rows": [asdict(row) for row in self.rows],
            "corpus": [asdict(entry) for entry in self.corpus],
            "hardware": self.hardware,
            "versions": self.versions,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        return cls(
            model=str(data["model"]),
            task=str(data["task"]),
            created_at=str(data.get("created_at", "")),
            rows=[BenchRow(**row) for row in data["rows"]],
            corpus=[CorpusThroughput(**entry) for entry in data.get("corpus", [])],
            hardware=dict(data.get("hardware", {})),
            versions=dict(data.get("versions", {})),
            settings=dict(data.get("settings", {})),
        )

    def write_json(self, path: Path) -> Path:
        """Write the report as JSON (atomically) and return the path."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def table(self) -> Table:
        """A rich table: engine, batch, p50 ms, p99 ms, rows/s, size, fidelity (corpus throughput as caption)."""
        from rich.table import Table
        from rich.text import Text

        # NOTE: Text, not str: rich reads "[...]" in a str as markup, and a model named "m[v2]" would print as "m".
        table = Table(title=Text(f"{self.model} ({self.task})"))
        for name in COLUMNS:
            table.add_column(name, justify="left" if name in ("engine", "fidelity") else "right")
        for row in self.rows:
            table.add_row(*map(Text, row.cells()))
        if self.corpus:
            table.caption = Text(
                "corpus throughput (sorted batching): "
                + ", ".join(f"{c.engine} {c.sentences_per_s:,.1f} sentences/s" for c in self.corpus)
            )
        return table


def primary_fidelity(fidelity: dict[str, float]) -> tuple[str, float] | None:
    """The one higher-is-better figure a plot puts on its axis: ``(label, value)``, or None when there is none.

    Mean cosine for embeddings, accuracy or R² for tasks with labels, else the negated max absolute error.
    """
    for key, label in _PRIMARY_FIDELITY:
        if key in fidelity:
            return label, fidelity[key]
    if "max_abs_error" in fidelity:
        return "− max abs error vs reference", -fidelity["max_abs_error"]
    return None


def fidelity_text(fidelity: dict[str, float]) -> str:
    """A short cell for the fidelity column, e.g. ``cos 0.9991 (worst 0.9874)`` or ``acc 0.953, Δmax 1.2e-03``."""
    if "mean_cosine" in fidelity:
        text = f"cos {fidelity['mean_cosine']:.4f}"
        if "worst_cosine" in fidelity:
            text += f" (worst {fidelity['worst_cosine']:.4f})"
        if "top10_overlap" in fidelity:
            text += f", top10 {fidelity['top10_overlap']:.2f}"
        return text
    parts = []
    if "accuracy" in fidelity:
        parts.append(f"acc {fidelity['accuracy']:.4f}")
    if "r2" in fidelity:
        parts.append(f"R² {fidelity['r2']:.4f}")
    if "max_abs_error" in fidelity:
        parts.append(f"Δmax {fidelity['max_abs_error']:.1e}")
    return ", ".join(parts) or "-"
