"""What every exported model must pass before it is written: structure, runnability, dynamic axes, parity."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ExportError, ParityError, UnsupportedOpError
from kiln.runtime import OrtEngine
from kiln.types import ONNX_TO_V2, Feeds, Signature, TensorSpec

_ORT_MISSING_OP = re.compile(r"Could not find an implementation for (\w+)\((\d+)\)")
_ORT_UNKNOWN_OP = re.compile(r"([\w.]*):?(\w+)\((-?\d+)\) is not a registered function/op")


def check_structure(path: Path) -> Any:
    """Run ``onnx.checker`` and shape inference; return the (shape-inferred) ModelProto."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=False)
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f'"{path}" is not a valid ONNX model: {first}; re-export it or fix the graph', path=str(path)
        ) from exc
    except Exception as exc:  # onnx raises DecodeError for garbage bytes
        raise ExportError(f'"{path}" could not be read as ONNX ({type(exc).__name__}: {exc})', path=str(path)) from exc


def signature_of(model: Any) -> Signature:
    """Inputs/outputs of a ModelProto (initializers excluded), with ``-1`` for symbolic or unknown dims."""

    def spec(value: Any) -> TensorSpec:
        ttype = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
        return TensorSpec(name=value.name, dtype=ONNX_TO_V2.get(ttype.elem_type, "BYTES"), shape=dims)

    initializers = {init.name for init in model.graph.initializer}
    return Signature(
        inputs=tuple(spec(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(spec(v) for v in model.graph.output),
    )


def opsets_of(model: Any) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}


def open_session(path: Path, model: Any) -> OrtEngine:
    """Load the model in ONNX Runtime, translating "no kernel for this op" into an actionable error."""
    try:
        return OrtEngine(path, name="export-check")
    except Exception as exc:
        text = str(exc)
        missing = _ORT_MISSING_OP.search(text)
        unknown = _ORT_UNKNOWN_OP.search(text)
        if missing or unknown:
            op = missing.group(1) if missing else unknown.group(2)  # type: ignore[union-attr]
            domain = "ai.onnx" if missing else (unknown.group(1) or "ai.onnx")  # type: ignore[union-attr]
            opset = opsets_of(model).get(domain, -1)
            raise UnsupportedOpError(
                f'operator "{op}" (domain {domain}, opset {opset}) has no implementation in ONNX Runtime '
                f"{_ort_version()} on this machine; export with a different opset (--opset), replace the op in "
                "the source model, or register a custom-op library",
                op=op,
                domain=domain,
                opset=opset,
            ) from exc
        raise ExportError(f'ONNX Runtime cannot load "{path}": {text.strip().splitlines()[-1]}') from exc


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def check_parity(
    reference: Callable[[Feeds], Feeds],
    engine: OrtEngine,
    feeds: Feeds,
    *,
    atol: float,
    rtol: float,
) -> dict[str, Any]:
    """Run source and export on the same feeds; raise ParityError naming the worst element if they differ.

    Returns per-output max absolute/relative error (recorded in the manifest's checks).
    """
    expected = reference(feeds)
    actual = engine.run(feeds)
    figures: dict[str, Any] = {}
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            raise ParityError(
                f'output "{name}" has shape {list(got.shape)} after export but {list(want.shape)} in the source '
                f"(inputs { ({k: list(v.shape) for k, v in feeds.items()}) }); a dynamic axis was probably frozen: "
                "mark it dynamic",
                output=name,
                expected_shape=list(want.shape),
                actual_shape=list(got.shape),
            )
        if not np.issubdtype(want.dtype, np.floating):
            mismatched = int(np.sum(got != want))
            if mismatched:
                raise ParityError(
                    f'output "{name}": {mismatched} of {want.size} values differ from the source (exact match '
                    "required for non-float outputs)",
                    output=name,
                )
            figures[name] = {"max_abs_error": 0.0, "max_rel_error": 0.0}
            continue
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        diff = np.abs(got64 - want64)
        allowed = atol + rtol * np.abs(want64)
        worst = np.unravel_index(int(np.argmax(diff - allowed)), diff.shape) if diff.size else ()
        if diff.size and (not np.all(np.isfinite(got64)) or np.any(diff > allowed)):
            index = tuple(int(i) for i in worst)
            raise ParityError(
                f'output "{name}" differs from the source beyond tolerance (atol={atol:g}, rtol={rtol:g}): worst '
                f"element {list(index)} is {float(got64[worst]):.6g} after export vs {float(want64[worst]):.6g} in "
                f"the source (|diff|={float(diff[worst]):.3g}); check for training-mode layers (call .eval()), "
                "unsupported ops or dtype changes, or loosen --parity-atol if the difference is expected",
                output=name,
                index=list(index),
                expected=float(want64[worst]),
                actual=float(got64[worst]),
                atol=atol,
                rtol=rtol,
            )
        figures[name] = {
            "max_abs_error": float(diff.max(initial=0.0)),
            "max_rel_error": float((diff / np.maximum(np.abs(want64), 1e-6)).max(initial=0.0)),
        }
    return figures
