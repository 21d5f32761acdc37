"""Tensor signatures and the dtype names that cross Kiln's boundaries (numpy, ONNX, KServe V2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# KServe V2 datatype <-> numpy. BYTES are object arrays of bytes/str.
V2_TO_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
NUMPY_TO_V2: dict[str, str] = {np.dtype(v).name: k for k, v in V2_TO_NUMPY.items()}

# ONNX TensorProto element types <-> V2 names (the subset Kiln models use).
ONNX_TO_V2: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, V2 datatype and shape (``-1`` marks a dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(V2_TO_NUMPY[self.dtype])
        return dtype

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of ``shape`` fits: the same rank, and each fixed axis the same size (-1: any size)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["datatype"]), shape=tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class Signature:
    """What a model takes and gives."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


Feeds = dict[str, np.ndarray[Any, Any]]
