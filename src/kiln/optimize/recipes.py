"""Candidate recipes: named chains of passes with their settings, chosen by what the model is and where it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.artifact import Artifact
from kiln.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Step:
    """One pass and its settings (recorded verbatim in the variant's provenance)."""

    kind: str  # "fuse_transformer" | "ort_graph" | "int8_dynamic" | "int8_static" | "fp16"
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.kind, "settings": dict(self.params)}


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Step, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "steps": [s.to_dict() for s in self.steps]}


_FUSE = Step("fuse_transformer")
_ORT = Step("ort_graph", {"level": "extended"})


def _dyn(per_channel: bool, reduce_range: bool = False, **extra: Any) -> Step:
    return Step("int8_dynamic", {"per_channel": per_channel, "reduce_range": reduce_range} | extra)


def _static(method: str) -> Step:
    return Step("int8_static", {"method": method, "per_channel": True})


TRANSFORMER_RECIPES = (
    Recipe("fused", (_FUSE,), "ORT transformer fusions (Attention, SkipLayerNorm, Gelu), fp32"),
    Recipe("fused-int8-dynamic", (_FUSE, _dyn(False)), "fusions + INT8 dynamic, per-tensor weights"),
    Recipe(
        "fused-int8-dynamic-per-channel",
        (_FUSE, _dyn(True)),
        "fusions + INT8 dynamic, per-channel weights",
    ),
    Recipe(
        "fused-int8-dynamic-per-channel-rr",
        (_FUSE, _dyn(True, True)),
        "fusions + INT8 dynamic, per-channel 7-bit weights (reduce_range: no int16 saturation without VNNI)",
    ),
)

TENSOR_RECIPES = (
    Recipe("ort-extended", (_ORT,), "ORT extended graph fusions saved offline, fp32"),
    Recipe("int8-dynamic-per-channel", (_dyn(True),), "INT8 dynamic, per-channel weights"),
    Recipe("int8-static-minmax", (_static("minmax"),), "INT8 static QDQ, per-channel, MinMax calibration"),
    Recipe("int8-static-entropy", (_static("entropy"),), "INT8 static QDQ, per-channel, entropy calibration"),
    Recipe("int8-static-percentile", (_static("percentile"),), "INT8 static QDQ, per-channel, 99.99th percentile"),
)

GPU_RECIPES = (Recipe("fp16", (Step("fp16"),), "float16 weights and compute (GPU providers only)"),)


def is_transformer(artifact: Artifact) -> bool:
    return bool(artifact.manifest.provenance.get("source", {}).get("framework") == "transformers")


def candidates(artifact: Artifact, *, gpu: bool, names: tuple[str, ...] = ()) -> list[Recipe]:
    """Recipes that apply to this artifact on this hardware, or the named ones (checked against all known)."""
    applicable = list(TRANSFORMER_RECIPES if is_transformer(artifact) else TENSOR_RECIPES)
    if gpu:
        applicable += GPU_RECIPES
    if not names:
        return applicable
    known = {r.name: r for r in (*TRANSFORMER_RECIPES, *TENSOR_RECIPES, *GPU_RECIPES)}
    chosen = []
    for name in names:
        if name not in known:
            raise ConfigError(
                f'recipe "{name}" is unknown{did_you_mean(name, known)}; recipes for this model: '
                f"{', '.join(r.name for r in applicable)}",
                recipe=name,
            )
        if known[name] not in applicable:
            raise ConfigError(
                f'recipe "{name}" does not apply to model "{artifact.name}" on this hardware; '
                f"use one of {', '.join(r.name for r in applicable)}",
                recipe=name,
            )
        chosen.append(known[name])
    return chosen
