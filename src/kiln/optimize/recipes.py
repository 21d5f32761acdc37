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


_ORT = Step("ort_graph", {"level": "extended"})


def _dyn(per_channel: bool, reduce_range: bool = False, **extra: Any) -> Step:
    return Step("int8_dynamic", {"per_channel": per_channel, "reduce_range": reduce_range} | extra)


def _static(method: str) -> Step:
    return Step("int8_static", {"method": method, "per_channel": True})


def transformer_recipes(num_heads: int = 0, hidden_size: int = 0) -> tuple[Recipe, ...]:
    """Recipes for a transformer encoder; the fuser needs the head count and width to find attention."""
    fuse = Step("fuse_transformer", {"num_heads": num_heads, "hidden_size": hidden_size})
    return (
        Recipe("fused", (fuse,), "ORT transformer fusions (Attention, SkipLayerNorm, Gelu), fp32"),
        Recipe("fused-int8-dynamic", (fuse, _dyn(False)), "fusions + INT8 dynamic, per-tensor weights"),
        Recipe("fused-int8-dynamic-per-channel", (fuse, _dyn(True)), "fusions + INT8 dynamic, per-channel weights"),
        Recipe(
            "fused-int8-dynamic-per-channel-rr",
            (fuse, _dyn(True, True)),
            "fusions + INT8 dynamic, per-channel 7-bit weights (reduce_range: no int16 saturation without VNNI)",
        ),
        Recipe(
            "fused-uint8-dynamic-per-channel",
            (fuse, _dyn(True, weight_type="uint8")),
            "fusions + INT8 dynamic, per-channel unsigned weights (U8U8 kernels: ORT's advice when S8 loses accuracy)",
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


def _already_quantized(artifact: Artifact) -> bool:
    """INT8 on top of INT8 is not a recipe: the quantizers cannot read their own output."""
    return any(
        step.get("pass", "").startswith("int8")
        for transform in artifact.manifest.provenance.get("transforms", [])
        for step in transform.get("steps", [])
    )


def is_transformer(artifact: Artifact) -> bool:
    """A Hugging Face encoder exported as it is, or a model around one (``kiln train``'s text classifier)."""
    source = artifact.manifest.provenance.get("source", {})
    return bool(source.get("framework") == "transformers" or source.get("transformer") is True)


def candidates(artifact: Artifact, *, gpu: bool, names: tuple[str, ...] = ()) -> list[Recipe]:
    """Recipes that apply to this artifact on this hardware, or the named ones (checked against all known)."""
    if is_transformer(artifact):
        source = artifact.manifest.provenance["source"]
        transformer = transformer_recipes(int(source.get("num_attention_heads", 0)), int(source.get("hidden_size", 0)))
        applicable = list(transformer)
    else:
        transformer, applicable = transformer_recipes(), list(TENSOR_RECIPES)
    if gpu:
        applicable += GPU_RECIPES
    if _already_quantized(artifact):
        applicable = [r for r in applicable if not any(s.kind.startswith("int8") for s in r.steps)]
    if not names:
        return applicable
    known = {r.name: r for r in (*transformer, *TENSOR_RECIPES, *GPU_RECIPES)}
    chosen = []
    for name in names:
        if name not in known:
            # the closest recipe that applies here first: suggesting a transformer recipe for a tabular model
            # leads straight to "does not apply"
            hint = did_you_mean(name, [r.name for r in applicable]) or did_you_mean(name, known)
            raise ConfigError(
                f'recipe "{name}" is unknown{hint}; recipes for this model: {", ".join(r.name for r in applicable)}',
                recipe=name,
            )
        if known[name] not in applicable:
            quantized = _already_quantized(artifact) and any(s.kind.startswith("int8") for s in known[name].steps)
            why = (
                f"version {artifact.version} is already INT8 (a variant of an earlier version)"
                if quantized
                else "on this hardware"
                if known[name] in GPU_RECIPES
                else "to its kind of graph"
            )
            raise ConfigError(
                f'recipe "{name}" does not apply to model "{artifact.name}" {why}; '
                f"use one of {', '.join(r.name for r in applicable)}"
                + (", or optimize the version it came from" if quantized else ""),
                recipe=name,
            )
        chosen.append(known[name])
    return chosen
