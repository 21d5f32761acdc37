"""``kiln optimize``: graph fusion, INT8 (dynamic, static QDQ), fp16 on GPU, and the guarded search that keeps
only variants that are really faster on this hardware."""

from __future__ import annotations

from kiln.config import OptimizeSettings
from kiln.optimize.passes import load_calibration
from kiln.optimize.recipes import Recipe, Step, candidates
from kiln.optimize.result import CandidateReport, OptimizeResult
from kiln.optimize.search import optimize

__all__ = [
    "CandidateReport",
    "OptimizeResult",
    "OptimizeSettings",
    "Recipe",
    "Step",
    "candidates",
    "load_calibration",
    "optimize",
]
