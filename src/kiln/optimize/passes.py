"""Graph passes that turn one ONNX file into another: fusion, INT8 dynamic, INT8 static QDQ, fp16.

Each pass reads ``src`` and writes ``dst`` and returns facts worth recording (fusions that fired, nodes
quantized). Passes never touch artifacts; the search decides what becomes a version.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from kiln.errors import CalibrationError, KilnError
from kiln.types import Feeds, Signature

logger = logging.getLogger(__name__)


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node))


def fuse_transformer(src: Path, dst: Path, *, num_heads: int = 0, hidden_size: int = 0) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm fusions).

    ``num_heads``/``hidden_size`` of 0 let the optimizer detect them from the graph. Returns the fused operator
    counts, e.g. ``{"Attention": 6, "SkipLayerNormalization": 12, ...}``.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(dst))
    logger.info("transformer fusions: %s", fused)
    return {"fusions": fused}


def ort_graph_optimize(src: Path, dst: Path, level: str = "extended") -> dict[str, Any]:
    """Save ONNX Runtime's own optimized graph (constant folding, node fusions) for non-transformer models.

    "extended" fusions are CPU-portable; the saved file still runs on any machine with ONNX Runtime.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    before, after = op_histogram(src), op_histogram(dst)
    if before == after:  # a copy (often larger: ORT writes its own metadata) must not compete by timer noise
        ops = ", ".join(f"{op} x{count}" for op, count in sorted(before.items()))
        raise KilnError(f"ONNX Runtime's {level} graph optimizations changed no node of this graph ({ops})")
    return {"nodes_before": sum(before.values()), "nodes_after": sum(after.values())}


def quantize_dynamic(
    src: Path,
    dst: Path,
    *,
    per_channel: bool,
    reduce_range: bool = False,
    weight_type: str = "int8",
    op_types: Sequence[str] = ("MatMul", "Attention", "Gemm"),
    nodes_to_exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """INT8 weights, activations quantized on the fly per batch (no calibration data needed)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with _root_logger_left_alone():
        ort_quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=list(nodes_to_exclude),
            # NOTE: fused graphs hold com.microsoft ops whose outputs shape inference cannot type; without a default
            # tensor type the quantizer gives up on them ("Unable to find data type for weight_name").
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1},  # 1 = TensorProto.FLOAT
        )
    return {"quantized_nodes": _require_quantized(src, dst)}


@contextlib.contextmanager
def _root_logger_left_alone() -> Iterator[None]:
    """ONNX Runtime's quantizer warns through ``logging.warning()``, which, on a root logger without handlers, calls
    ``logging.basicConfig()``: a Python caller's process kept a stderr handler (and its own ``basicConfig`` then did
    nothing). A NullHandler for the call keeps the root logger as it was, and the advice off stderr."""
    root = logging.getLogger()
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)


class FeedsReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, batches: Sequence[Feeds]) -> None:
        self._batches = list(batches)
        self._iter: Iterator[Feeds] = iter(self._batches)

    def get_next(self) -> Feeds | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def validate_calibration(batches: Sequence[Feeds], signature: Signature) -> list[Feeds]:
    """Calibration feeds must name the model's inputs with matching dtype and fixed dims.

    Returns the batches with each array in its input's dtype: a float array for a float input is cast (an .npz
    saved from default NumPy holds float64, ORT's calibrator wants the model's float32), and so is an integer
    array for an integer input when every value fits. Any other dtype mismatch is a CalibrationError.
    """
    if not batches:
        raise CalibrationError("calibration data is empty; pass at least one batch of real inputs")
    conformed: list[Feeds] = []
    for number, feeds in enumerate(batches):
        batch = dict(feeds)
        extra = [name for name in feeds if name not in signature.input_names]
        if extra:  # ONNX Runtime's calibrator fails on it as "Invalid input name", read as "does not apply"
            raise CalibrationError(
                f'calibration batch {number} has an array "{extra[0]}", which is not an input of the model (its '
                f"inputs: {', '.join(signature.input_names)}); name one array after each input, and nothing else",
                batch=number,
                input=extra[0],
            )
        for spec in signature.inputs:
            if spec.name not in feeds:
                raise CalibrationError(
                    f'calibration batch {number} has no input "{spec.name}" (it has {", ".join(feeds) or "none"}); '
                    f"give every input the model takes: {', '.join(signature.input_names)}",
                    batch=number,
                    input=spec.name,
                )
            array = feeds[spec.name]
            if not spec.fits(array.shape):
                raise CalibrationError(
                    f'calibration batch {number}, input "{spec.name}" has shape {list(array.shape)}; the model '
                    f"expects {list(spec.shape)} (-1 = any size); reshape the calibration data to match",
                    batch=number,
                    input=spec.name,
                    expected=list(spec.shape),
                    actual=list(array.shape),
                )
            batch[spec.name] = _as_input_dtype(array, spec.numpy_dtype, number, spec.name)
            if batch[spec.name].dtype.kind == "f" and not np.isfinite(batch[spec.name]).all():
                raise CalibrationError(  # the activation ranges would be NaN: ORT says "scale issue"
                    f'calibration batch {number}, input "{spec.name}" holds NaN or infinite values; calibrate on '
                    "real, finite inputs (drop or fill those rows)",
                    batch=number,
                    input=spec.name,
                )
        conformed.append(batch)
    return conformed


def _as_input_dtype(array: Any, want: Any, number: int, name: str) -> Any:
    if array.dtype == want:
        return array
    same_kind = (array.dtype.kind == want.kind == "f") or (array.dtype.kind in "iu" and want.kind in "iu")
    cast = array.astype(want) if same_kind else None
    if cast is None or (want.kind in "iu" and not (cast == array).all()):
        raise CalibrationError(
            f'calibration batch {number}, input "{name}" has dtype {array.dtype}; the model expects {want}; '
            f"save the calibration arrays as {want} (e.g. array.astype(np.{want.name}))",
            batch=number,
            input=name,
            expected=str(want),
            actual=str(array.dtype),
        )
    return cast


def quantize_static(
    src: Path,
    dst: Path,
    calibration: Sequence[Feeds],
    signature: Signature,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    op_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """INT8 QDQ with activation ranges calibrated on real inputs (MinMax, Entropy or Percentile)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    calibration = validate_calibration(calibration, signature)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise KilnError(f'calibration method "{method}" is unknown; use one of {", ".join(methods)}')
    from onnxruntime.quantization.registry import QDQRegistry

    if not set(op_types or QDQRegistry) & set(op_histogram(src)):  # ORT's histogram calibrators crash on such a graph
        _nothing_quantized(src)
    chatter = io.StringIO()
    # ORT's calibrators print() progress; keep it off the user's stdout
    with contextlib.redirect_stdout(chatter), _root_logger_left_alone():
        ort_quantize_static(
            str(src),
            str(dst),
            FeedsReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibMovingAverage": True}
            | ({"CalibPercentile": 99.99} if method == "percentile" else {}),
        )
    logger.debug("calibration output: %s", chatter.getvalue())
    return {"quantized_nodes": _require_quantized(src, dst), "calibration_batches": len(calibration), "method": method}


def to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Float16 weights and compute, keeping float32 inputs/outputs (GPU only: CPUs gain nothing here)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return {}


def _count_quantized(path: Path) -> int:
    ops = op_histogram(path)
    return sum(
        v
        for k, v in ops.items()
        if k.startswith(("QLinear", "MatMulInteger", "DynamicQuantize", "QAttention", "QGemm")) or k == "QuantizeLinear"
    )


def _require_quantized(src: Path, dst: Path) -> int:
    """The number of quantized nodes in ``dst``; a KilnError when there are none.

    NOTE: ORT's quantizers copy a graph they cannot quantize (tree ensembles, linear classifiers of ai.onnx.ml)
    unchanged; such a copy must not compete, let alone win by timer noise, under the name of an INT8 recipe.
    """
    quantized = _count_quantized(dst)
    if quantized == 0:
        _nothing_quantized(src)
    return quantized


def _nothing_quantized(src: Path) -> NoReturn:
    ops = ", ".join(sorted(op_histogram(src)))
    raise KilnError(f"no node was quantized: the graph has no operator the INT8 pass quantizes (its ops: {ops})")


def load_calibration(path: Path, batch_rows: int = 16) -> list[Feeds]:
    """Calibration batches from an ``.npz`` whose arrays are named like the model inputs (first axis = rows)."""
    from kiln.data import read_npz

    arrays = read_npz(path, "calibration file", CalibrationError)
    if not arrays:
        raise CalibrationError(
            f'calibration file "{path}" holds no arrays; save one array of rows per model input, named like it '
            "(np.savez(path, input=rows))",
            path=str(path),
        )
    scalars = sorted(k for k, v in arrays.items() if v.ndim == 0)
    if scalars:
        raise CalibrationError(
            f'calibration array "{scalars[0]}" in "{path}" is a scalar; each array holds rows of one input (first '
            "axis = rows)",
            path=str(path),
        )
    rows = {len(v) for v in arrays.values()}
    if len(rows) != 1:
        raise CalibrationError(
            f'calibration arrays in "{path}" have different row counts {sorted(rows)}; they must match'
        )
    total = rows.pop()
    return [
        {k: v[i : i + batch_rows] for k, v in arrays.items()}
        for i in range(0, total - total % batch_rows or total, batch_rows)
    ]
