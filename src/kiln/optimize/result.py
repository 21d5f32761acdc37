"""What a search found: every candidate with its figures, and the chosen variant."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln._utils import human_bytes
from kiln.artifact import Artifact
from kiln.optimize.recipes import Recipe


@dataclass
class CandidateReport:
    recipe: Recipe
    path: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    parent_speed: dict[str, Any] = field(default_factory=dict)
    speedup: float = 0.0
    size_bytes: int = 0
    within_budget: bool = False
    pareto: bool = False
    status: str = "pending"  # eligible | chosen | rejected | skipped
    reason: str = ""

    @classmethod
    def skipped(cls, recipe: Recipe, reason: str) -> CandidateReport:
        return cls(recipe=recipe, status="skipped", reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "status": self.status,
            "reason": self.reason,
            "fidelity": self.figures,
            "within_budget": self.within_budget,
            "speedup": self.speedup,
            "speed": self.speed,
            "parent_speed": self.parent_speed,
            "size_bytes": self.size_bytes,
            "pareto": self.pareto,
            "passes": self.history,
        }


@dataclass
class OptimizeResult:
    parent: Artifact
    chosen: Artifact | None
    candidates: list[CandidateReport]
    hardware: dict[str, Any]
    settings: dict[str, Any]
    parent_figures: dict[str, float]

    @property
    def best(self) -> CandidateReport | None:
        return next((c for c in self.candidates if c.status == "chosen"), None)

    def fusions(self) -> list[str]:
        """Distinct fusion reports of the search, e.g. ``"Attention x6, SkipLayerNormalization x12"``."""
        seen: list[str] = []
        for candidate in self.candidates:
            for step in candidate.history:
                fused = step.get("facts", {}).get("fusions")
                text = ", ".join(f"{op} x{count}" for op, count in (fused or {}).items())
                if text and text not in seen:
                    seen.append(text)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent": self.parent.ref(),
            "parent_fidelity": self.parent_figures,
            "chosen": self.chosen.ref() | {"path": str(self.chosen.path)} if self.chosen else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "hardware": self.hardware,
            "settings": self.settings,
        }

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def table(self) -> Any:
        """A rich Table: one row per candidate, the chosen one marked."""
        from rich.table import Table

        target = str(self.settings.get("target_batch_size", 32))
        table = Table(title=f"kiln optimize: {self.parent.name} v{self.parent.version}")
        for column in ("recipe", "fidelity", f"rows/s @{target}", "speedup", "size", "pareto", "verdict"):
            table.add_column(column, justify="right" if column not in ("recipe", "verdict") else "left")
        for c in self.candidates:
            fidelity = (
                f"cos {c.figures['mean_cosine']:.4f}/{c.figures['worst_cosine']:.3f}"
                if "mean_cosine" in c.figures
                else f"{c.figures.get('score', float('nan')):.4f}"
                if c.figures
                else "-"
            )
            rows = f"{c.speed[target]['rows_per_s']:.1f}" if target in c.speed else "-"
            verdict = ("[green]chosen[/] " if c.status == "chosen" else "") + c.reason
            table.add_row(
                c.recipe.name,
                fidelity,
                rows,
                f"{c.speedup:.2f}x" if c.speedup else "-",
                human_bytes(c.size_bytes) if c.size_bytes else "-",
                "*" if c.pareto else "",
                verdict,
            )
        return table
