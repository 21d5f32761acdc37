"""KServe V2 tensors <-> numpy: JSON data (flat or nested), the binary tensor extension, and BYTES serialisation.

The binary layout of a tensor is the same for HTTP's binary extension and gRPC's ``raw_input_contents``: the
row-major little-endian elements, and for BYTES each element as a 4-byte little-endian length then its bytes.
Every malformed input raises ``InvalidInput`` with the tensor's name, the rule and the fix.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

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


# keyed by the dtype itself: every response looks its outputs up here, and ``dtype.name`` is a Python property
_V2_OF_DTYPE: dict[np.dtype[Any], str] = {np.dtype(name): v2 for name, v2 in NUMPY_TO_V2.items()}


def v2_datatype(array: Array) -> str:
    dtype = array.dtype
    if dtype.kind in "OSU":
        return "BYTES"
    return _V2_OF_DTYPE.get(dtype) or NUMPY_TO_V2[dtype.name]


# numpy's limit (NPY_MAXDIMS); past it numpy raises ValueError, so the codec refuses the shape first
MAX_DIMENSIONS = 64


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A V2 shape as a tuple, or a clear error: a list of at most 64 non-negative integers (booleans are not)."""
    if not isinstance(shape, list | tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(
            f'input "{name}" has shape {shape!r}; a shape is a list of non-negative integers, e.g. [2, 4]',
            input=name,
        )
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidInput(
            f'input "{name}" has {len(shape)} dimensions; this server takes at most {MAX_DIMENSIONS} (numpy\'s '
            "limit); reshape the tensor to fewer dimensions",
            input=name,
            shape=list(shape),
        )
    return tuple(shape)


def _element_count(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def from_json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Array:
    """A tensor from V2 JSON ``data`` (flat in row-major order, or nested), checked against ``shape``.

    Strict as Triton is: BOOL takes JSON booleans, INT*/UINT* JSON integers, FP* JSON numbers (integers or floats)
    whose value fits the datatype. Nothing is coerced: ``"false"`` is not ``false``, ``1.7`` is not an INT8.
    """
    dtype = numpy_dtype(datatype, name)
    expected = _element_count(shape)
    flat, kinds = _flatten(data)
    if len(flat) != expected:
        raise InvalidInput(
            f'input "{name}" has {len(flat)} elements but shape {list(shape)} needs {expected}; '
            "make the data match the shape",
            input=name,
            shape=list(shape),
        )
    if datatype == "BYTES":
        return _bytes_array(name, flat).reshape(shape)
    return _numeric_array(name, datatype, dtype, flat, kinds).reshape(shape)


# The JSON types a numeric datatype takes, by numpy kind. NOTE: bool is its own type here, not an int, because the
# sets hold exact types (``type(True) is bool``), which is what lets one set comparison refuse true for an INT32.
_JSON_TYPES: dict[str, frozenset[type]] = {
    "b": frozenset({bool}),
    "i": frozenset({int}),
    "u": frozenset({int}),
    "f": frozenset({int, float}),
}
_TYPE_NAMES: dict[type, str] = {
    bool: " (a boolean)",
    int: " (an integer)",
    float: " (a float)",
    str: " (a string)",
    list: " (a list)",
    dict: " (an object)",
    type(None): "",  # "null" says it
}


def _numeric_array(name: str, datatype: str, dtype: np.dtype[Any], flat: list[Any], kinds: set[type]) -> Array:
    allowed = _JSON_TYPES[dtype.kind]
    if not kinds <= allowed:  # one set comparison on the hot path; the element is looked for only on error
        index, item = next((i, item) for i, item in enumerate(flat) if type(item) not in allowed)
        if dtype.kind == "b":
            rule = "BOOL data must be JSON booleans: send true or false"
        elif dtype.kind in "iu":
            rule = f"{datatype} data must be JSON integers: send whole numbers, not floats, booleans or strings"
        else:
            rule = f"{datatype} data must be JSON numbers: send integers or floats, not booleans, strings or null"
        raise InvalidInput(
            f'input "{name}" has data that is not {datatype}: element {index} is {_show(item)}; {rule}',
            input=name,
            datatype=datatype,
            element=index,
        )
    try:
        if dtype.kind != "f":
            return np.asarray(flat, dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is found below, by isfinite
            array = np.asarray(flat, dtype=dtype)
    except OverflowError:  # an integer outside the datatype's range (numpy 2 refuses it rather than wrap)
        raise _out_of_range(name, datatype, dtype, flat) from None
    # a finite value that became inf does not fit; inf and nan themselves can only come from gRPC's typed contents
    if not np.isfinite(array).all() and any(
        math.isfinite(flat[i]) for i in np.flatnonzero(~np.isfinite(array)).tolist()
    ):
        raise _out_of_range(name, datatype, dtype, flat)
    return array


def _out_of_range(name: str, datatype: str, dtype: np.dtype[Any], flat: list[Any]) -> InvalidInput:
    index, item = next((i, item) for i, item in enumerate(flat) if not _fits(item, dtype))
    if dtype.kind == "f":
        limit = f"(largest finite {float(np.finfo(dtype).max):.8g}); send smaller values"
    else:
        info = np.iinfo(dtype)
        limit = f"[{info.min}, {info.max}]; send values in that range"
    value = _show(item, typed=False)
    return InvalidInput(
        f'input "{name}" has data that is not {datatype}: element {index} is {value}, out of range for {datatype} '
        f"{limit} or use a wider datatype",
        input=name,
        datatype=datatype,
        element=index,
    )


def _fits(item: int | float, dtype: np.dtype[Any]) -> bool:
    try:
        with np.errstate(over="ignore"):
            value = dtype.type(item)
    except OverflowError:
        return False
    return dtype.kind != "f" or not math.isfinite(item) or bool(np.isfinite(value))


def json_text(value: Any) -> str:
    """A client's value as JSON, the way it was written ('null', '"false"', '{"a":1}'), for error messages."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def _show(item: Any, *, typed: bool = True) -> str:
    """An element as the client wrote it (JSON; numbers as Python prints them), shortened, and its JSON type."""
    text = repr(item) if isinstance(item, int | float) and not isinstance(item, bool) else json_text(item)
    if len(text) > 40:
        text = text[:37] + "..."
    if not typed:
        return text
    return text + _TYPE_NAMES.get(type(item), f" (a {type(item).__name__})")


def _bytes_array(name: str, flat: list[Any]) -> Array:
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
    return array


def _flatten(data: Any) -> tuple[list[Any], set[type]]:
    """Nested JSON data -> its elements in row-major order, and the set of their exact types.

    Level by level with builtins that run in C (a regular nest, the usual case); element by element only where a
    level mixes lists and scalars, which Triton also accepts: it counts the elements, whatever the nesting.
    """
    flat: list[Any] = data if isinstance(data, list) else [data]
    kinds = set(map(type, flat))
    while list in kinds:
        flat = list(itertools.chain.from_iterable(flat)) if len(kinds) == 1 else _flatten_mixed(flat)
        kinds = set(map(type, flat))
    return flat, kinds


def _flatten_mixed(data: list[Any]) -> list[Any]:
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
    if datatype == "BOOL":  # a byte of 2 was read as false by ONNX Runtime: the answer was silently wrong
        octets = np.frombuffer(raw, dtype=np.uint8)
        bad = np.flatnonzero(octets > 1)
        if bad.size:
            raise InvalidInput(
                f'input "{name}" (BOOL) holds byte {int(octets[bad[0]])} at element {int(bad[0])}; a BOOL element is '
                "one byte, 0 (false) or 1 (true)",
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


def to_json_data(array: Array) -> list[Any] | orjson.Fragment:
    """Flat row-major JSON data; BYTES as UTF-8 strings (Triton's behaviour).

    NaN and infinities are written ``NaN``, ``Infinity`` and ``-Infinity``, as Python's json module, rapidjson
    (tritonclient's parser) and JSON5 read them: JSON has no such numbers, and orjson wrote all three as ``null``,
    which a client read back as NaN, losing the sign and the difference. Binary outputs carry them exactly.
    """
    if array.dtype == np.object_:
        return [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    flat: list[Any] = array.reshape(-1).tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return orjson.Fragment(json.dumps(flat, allow_nan=True, separators=(",", ":")))
    return flat


def check_priority(value: Any) -> None:
    """The ``priority`` request parameter of Triton's schedule-policy extension: a whole number >= 0 (uint64).

    Kiln serves every request at one level, as Triton does for a model without priority levels, so a valid
    priority changes nothing; a malformed one (``"high"``, -1, 1.5) is the client's mistake, and was taken.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64):
        raise InvalidInput(
            f'parameter "priority" is {json_text(value)}; a priority is a whole number >= 0 (0: the default level), '
            "or leave it out (this server runs every request at one level)"
        )


def class_count(output: str, value: Any) -> int:
    """The ``classification`` parameter of a requested output: how many top classes to return, a positive integer."""
    if type(value) is not int or value < 1:
        raise InvalidInput(
            f'parameter "classification" of output "{output}" is {json_text(value)}; it is the number of top '
            'classes to return, a positive integer (e.g. {"classification": 3}), or leave it out for the tensor',
            output=output,
        )
    return value


def top_classes(array: Array, count: int, labels: Sequence[str], *, batched: bool = True) -> Array:
    """Triton's classification extension: each row's ``count`` highest values (fewer if a row has fewer) as BYTES
    ``"<value>:<index>[:<label>]"``, highest first, ties by index; shape ``[rows, count]`` (``[count]`` unbatched).

    ``<index>`` counts the row's elements in row-major order; ``<label>`` is ``labels[index]`` where there is one.
    Values print as C's ``std::to_string`` does, as Triton's do: 6 decimals for floats.
    """
    rows = array.reshape(len(array), -1) if batched and array.ndim else array.reshape(1, -1)
    width = rows.shape[1]
    # descending, ties by index: a stable ascending sort of each row reversed, read backwards, indices mapped back
    order = width - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, : min(count, width)]
    show = (lambda v: f"{v:f}") if rows.dtype.kind == "f" else str
    out = np.empty(order.shape, dtype=np.object_)
    for r, (row, picked) in enumerate(zip(rows, order, strict=True)):
        for c, index in enumerate(picked.tolist()):
            label = f":{labels[index]}" if index < len(labels) else ""
            out[r, c] = f"{show(row[index].item())}:{index}{label}".encode()
    return out if batched and array.ndim else out.reshape(-1)


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
