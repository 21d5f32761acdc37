"""Turn a recipe into an ONNX file, reusing shared prefixes (e.g. the fused graph) across recipes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.optimize import passes
from kiln.optimize.recipes import Recipe, Step
from kiln.types import Feeds, Signature


class RecipeBuilder:
    """Builds recipe outputs in ``workdir``; a step chain already built (same steps, same order) is reused."""

    def __init__(
        self,
        source: Path,
        signature: Signature,
        workdir: Path,
        calibration: Callable[[], Sequence[Feeds]],
    ) -> None:
        self._source = source
        self._signature = signature
        self._workdir = workdir
        self._calibration = calibration
        self._calibration_cache: Sequence[Feeds] | None = None
        self._built: dict[str, tuple[Path, list[dict[str, Any]]]] = {}

    def build(self, recipe: Recipe) -> tuple[Path, list[dict[str, Any]]]:
        """The recipe's model file and, per step, the pass settings and the facts it reported."""
        current: Path = self._source
        history: list[dict[str, Any]] = []
        for depth in range(1, len(recipe.steps) + 1):
            prefix = recipe.steps[:depth]
            key = json.dumps([s.to_dict() for s in prefix], sort_keys=True)
            if key in self._built:
                current, history = self._built[key]
                continue
            step = prefix[-1]
            target = self._workdir / f"{recipe.name}-{depth}.onnx"
            facts = self._apply(step, current, target)
            current, history = target, [*history, step.to_dict() | {"facts": facts}]
            self._built[key] = (current, history)
        return current, history

    def _apply(self, step: Step, src: Path, dst: Path) -> dict[str, Any]:
        params = step.params
        if step.kind == "fuse_transformer":
            return passes.fuse_transformer(src, dst, **params)
        if step.kind == "ort_graph":
            return passes.ort_graph_optimize(src, dst, params.get("level", "extended"))
        if step.kind == "int8_dynamic":
            return passes.quantize_dynamic(src, dst, **params)
        if step.kind == "int8_static":
            if self._calibration_cache is None:
                self._calibration_cache = self._calibration()
            return passes.quantize_static(src, dst, self._calibration_cache, self._signature, **params)
        if step.kind == "fp16":
            return passes.to_fp16(src, dst)
        raise AssertionError(f"unknown pass {step.kind}")
