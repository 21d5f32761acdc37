"""KServe V2 tensors <-> numpy: JSON data (flat or nested), the binary tensor extension, and BYTES serialisation.

The binary layout of a tensor is the same for HTTP's binary extension and gRPC's ``raw_input_contents``: the
row-major little-endian elements, and for BYTES each element as a 4-byte little-endian length then its bytes.
Every malformed input raises ``InvalidInput`` with the tensor's name, the rule and the fix.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.errors import InvalidInput
from kiln.serve.protocol import Array
from kiln.types import NUMPY_TO_V2, V2_TO_NUMPY

_LENGTH = struct.Struct("<I")


def numpy_dtype(datatype: str, name: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name, or a clear error naming the tensor."""
    try:
        dtype: np.dtype[Any] = np.dtype(V2_TO_NUMPY[datatype])
    except KeyError:
        raise InvalidInput(
            f'input "{name}" has datatype "{datatype}", which is not a KServe V2 datatype; '
            f"use one of {', '.join(V2_TO_NUMPY)}",
            input=name,
            datatype=datatype,
        ) from None
    return dtype


def v2_datatype(array: Array) -> str:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    return NUMPY_TO_V2[array.dtype.name]


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(
            f'input "{name}" has shape {shape!r}; a shape is a list of non-negative integers, e.g. [2, 4]',
            input=name,
        )
    return tuple(int(d) for d in shape)


def _element_count(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def from_json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Array:
    """A tensor from V2 JSON ``data`` (flat in row-major order, or nested), checked against ``shape``."""
    dtype = numpy_dtype(datatype, name)
    expected = _element_count(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        array = np.empty(len(flat), dtype=np.object_)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                array[i] = item.encode("utf-8")
            elif isinstance(item, bytes):
                array[i] = item
            else:
                raise InvalidInput(
                    f'input "{name}" is BYTES but element {i} is {type(item).__name__} {item!r}; send strings',
                    input=name,
                )
    else:
        try:
            array = np.asarray(data, dtype=dtype).reshape(-1)
        except OverflowError as exc:
            raise InvalidInput(
                f'input "{name}" has a value out of range for {datatype} ({exc}); send values that fit {datatype}',
                input=name,
            ) from None
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f'input "{name}" has data that is not {datatype} ({exc}); send numbers of that type, '
                "flat in row-major order or nested",
                input=name,
            ) from None
    if array.size != expected:
        raise InvalidInput(
            f'input "{name}" has {array.size} elements but shape {list(shape)} needs {expected}; '
            "make the data match the shape",
            input=name,
            shape=list(shape),
        )
    return array.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> Array:
    """A tensor from its binary form (HTTP binary extension or gRPC raw contents)."""
    dtype = numpy_dtype(datatype, name)
    expected = _element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, expected).reshape(shape)
    if len(raw) != expected * dtype.itemsize:
        raise InvalidInput(
            f'input "{name}" has {len(raw)} bytes of binary data but shape {list(shape)} of {datatype} needs '
            f"{expected * dtype.itemsize}; send exactly the tensor's bytes",
            input=name,
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int) -> Array:
    """Length-prefixed BYTES elements -> an object array of ``bytes``."""
    view = memoryview(raw)
    if count * _LENGTH.size > len(view):  # before allocating: the shape is the client's word, the bytes are real
        raise InvalidInput(
            f'input "{name}": its shape holds {count} BYTES elements but the data has {len(view)} bytes, and each '
            "element needs at least 4 (its little-endian length); make the shape match the data",
            input=name,
        )
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(
                f'input "{name}": BYTES data ends after {i} of {count} elements; each element is a 4-byte '
                "little-endian length followed by that many bytes",
                input=name,
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(
                f'input "{name}": BYTES element {i} claims {length} bytes but only {len(view) - offset} remain',
                input=name,
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInput(
            f'input "{name}": {len(view) - offset} bytes left over after {count} BYTES elements; '
            "the shape and the data disagree",
            input=name,
        )
    return out


def serialize_bytes(array: Array) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def to_bytes(array: Array) -> bytes:
    """The binary form of a tensor (little-endian, row-major; BYTES length-prefixed)."""
    if array.dtype == np.object_:
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def to_json_data(array: Array) -> list[Any]:
    """Flat row-major JSON data; BYTES as UTF-8 strings (Triton's behaviour)."""
    if array.dtype == np.object_:
        return [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def decode_texts(name: str, array: Array) -> list[str]:
    """UTF-8 strings of a BYTES tensor, or a clear error naming the first element that is not UTF-8."""
    texts: list[str] = []
    for i, item in enumerate(array.reshape(-1)):
        try:
            texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f'input "{name}": element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 text',
                input=name,
            ) from None
    return texts
