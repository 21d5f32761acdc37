"""ONNX Runtime engine: providers, threads and session options in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, InvalidInput, ModelNotFound, did_you_mean
from kiln.runtime.hardware import default_intra_op_threads, preferred_providers
from kiln.types import ONNX_TO_V2, Feeds, TensorSpec

_ORT_TYPE_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}
assert set(_ORT_TYPE_TO_V2.values()) <= set(ONNX_TO_V2.values())

# ONNX Runtime's load errors that say the model itself cannot be run here (by class name: the set differs between
# versions). Device and engine failures (EPFail, DeviceReset, EngineError, RuntimeException) are not the model's
# fault and pass through as they are.
_ORT_CORRUPT = ("InvalidProtobuf", "NoModel", "NoSuchFile")
_ORT_UNRUNNABLE = ("InvalidGraph", "NotImplemented", "Fail", "InvalidArgument", "ModelRequiresCompilation")


# Operators whose output for one row depends on the other rows of its batch: ONNX Runtime's INT8 dynamic
# quantization picks one scale and zero point for a whole activation tensor, padding included.
BATCH_COUPLED_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})
assert all(op.startswith("DynamicQuantize") for op in BATCH_COUPLED_OPS)  # batch_coupled_ops looks for that


def batch_coupled_ops(path: Path) -> list[str]:
    """The operators of the graph at ``path`` that couple the rows of a batch (``BATCH_COUPLED_OPS``), sorted."""
    import mmap

    import onnx

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(b"DynamicQuantize") < 0:  # an op type is stored as its name: none of them is in the graph
            return []  # found without parsing the weights, which takes 0.25 s for MiniLM's FP32 graph
    model = onnx.load(str(path), load_external_data=False)
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    return sorted({node.op_type for node in nodes} & BATCH_COUPLED_OPS)


def _spec(node: Any) -> TensorSpec:
    dtype = _ORT_TYPE_TO_V2.get(node.type, "BYTES" if "seq" in node.type or "map" in node.type else node.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or []))
    return TensorSpec(name=node.name, dtype=dtype, shape=shape)


def _load_error(model: Path | str | bytes, exc: Exception, ort_version: str) -> ArtifactError | None:
    """The Kiln error for ONNX Runtime refusing to load ``model`` (``None`` when it is not the model's fault)."""
    kind = type(exc).__name__
    if kind in _ORT_CORRUPT:
        fix = "the file is corrupt or truncated: restore it or export the model again"
    elif kind in _ORT_UNRUNNABLE:
        fix = (
            "export the model again with an opset this runtime supports (--opset), or serve it with the "
            "onnxruntime it was exported for"
        )
    else:
        return None
    where = f'"{model}"' if isinstance(model, str | Path) else f"the {len(model)}-byte model given as bytes"
    ort_message = " ".join(str(exc).split()) or kind  # one line, for logs and the repository index
    return ArtifactError(
        f"{where} is not a model ONNX Runtime can load (onnxruntime {ort_version}, {kind}: {ort_message}); {fix}",
        path=str(model) if isinstance(model, str | Path) else None,
        ort_error=kind,
    )


class OrtEngine:
    """An ONNX Runtime inference session behind Kiln's ``Engine`` interface.

    Example:
        >>> engine = OrtEngine("kiln-repo/digits/1/model.onnx")  # doctest: +SKIP
        >>> engine.run({"input": x})["probabilities"].shape  # doctest: +SKIP
        (8, 10)
    """

    def __init__(
        self,
        model: Path | str | bytes,
        *,
        name: str = "onnxruntime",
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        graph_optimization: str = "all",
        allow_spinning: bool = True,
    ) -> None:
        import onnxruntime as ort

        if isinstance(model, str | Path) and not Path(model).is_file():
            raise ModelNotFound(f'model file "{model}" does not exist', path=str(model))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        if not allow_spinning:
            # Spinning threads burn a core between runs; a server sharing cores with its event loop turns it off.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.name = name
        self.providers = providers or preferred_providers()
        source = str(model) if isinstance(model, str | Path) else model
        try:
            self._session = ort.InferenceSession(source, sess_options=options, providers=self.providers)
        except Exception as exc:
            error = _load_error(model, exc, ort.__version__)
            if error is None:
                raise
            raise error from exc
        # ONNX Runtime's class for inputs it refuses at run time, looked up once (run() is the hot path)
        self._invalid_argument: type[Exception] = ort.capi.onnxruntime_pybind11_state.InvalidArgument
        self._inputs = [_spec(i) for i in self._session.get_inputs()]
        self._outputs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        self.settings: dict[str, Any] = {
            "providers": self.providers,
            "intra_op_threads": options.intra_op_num_threads,
            "inter_op_threads": inter_op_threads,
            "graph_optimization": graph_optimization,
        }

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, feeds: Feeds) -> Feeds:
        expected = {spec.name: spec for spec in self._inputs}
        unknown = [k for k in feeds if k not in expected]
        if unknown:
            raise InvalidInput(
                f'input "{unknown[0]}" is not an input of this model{did_you_mean(unknown[0], expected)}; '
                f"its inputs are {', '.join(expected)}",
                input=unknown[0],
            )
        missing = [k for k in expected if k not in feeds]
        if missing:
            raise InvalidInput(
                f'input "{missing[0]}" is missing; this model needs {", ".join(expected)}', input=missing[0]
            )
        ready = {k: self._ready(expected[k], v) for k, v in feeds.items()}
        try:
            values = self._session.run(self._output_names, ready)
        except self._invalid_argument as exc:
            # The names were checked above and the dtypes cast: what ONNX Runtime refuses is the values or the
            # shapes the graph cannot take (an index past a table, tensors of different lengths).
            raise InvalidInput(
                f"ONNX Runtime refused the input values of model {self.name!r}: {exc}; check the values (for "
                "token ids: within the vocabulary, every tensor of the same length)"
            ) from None
        return dict(zip(self._output_names, values, strict=True))

    def _ready(self, spec: TensorSpec, value: Any) -> np.ndarray[Any, Any]:
        """``value`` as a contiguous array of the input's dtype; InvalidInput naming the input when its values
        cannot be read as that dtype or its shape does not fit (ONNX Runtime's own text names neither well)."""
        try:
            array = np.ascontiguousarray(value, dtype=spec.numpy_dtype)
        except (TypeError, ValueError) as exc:
            given = getattr(value, "dtype", type(value).__name__)
            raise InvalidInput(
                f'input "{spec.name}" of model {self.name!r} holds {given} values that cannot be read as '
                f"{spec.dtype} ({exc}); pass {spec.dtype} values",
                input=spec.name,
                expected=spec.dtype,
                actual=str(given),
            ) from None
        # NOTE: ONNX Runtime reports an input of unknown rank with shape []: only a known rank is checked here.
        if spec.shape and not spec.fits(array.shape):
            raise InvalidInput(
                f'input "{spec.name}" has shape {list(array.shape)}; model {self.name!r} takes {list(spec.shape)} '
                "(-1 = any size); pass rows of that shape",
                input=spec.name,
                expected=list(spec.shape),
                actual=list(array.shape),
            )
        return array
