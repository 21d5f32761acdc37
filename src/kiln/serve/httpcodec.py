"""A KServe V2 HTTP inference body (JSON header, optionally followed by binary tensor data) -> ``InferRequest``.

Framework-free, so ``http.py`` keeps to routing, bodies and status codes. Every malformed request raises
``InvalidInput`` naming the value, the rule and the fix.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import orjson

from kiln.errors import InvalidInput, PayloadTooLarge
from kiln.serve.codec import (
    check_priority,
    check_shape,
    class_count,
    from_bytes,
    from_json_data,
    json_text,
    numpy_dtype,
)
from kiln.serve.protocol import InferRequest, RequestedOutput

HEADER_LENGTH = "inference-header-content-length"
TIMEOUT_HEADER = "timeout-ms"


def decode_infer(body: bytes, header_length: str | None, timeout_header: str | None) -> InferRequest:
    """A V2 infer body (JSON, or JSON header + binary tensors) -> ``InferRequest``."""
    if header_length is not None:
        if not is_ascii_digits(header_length) or int(header_length) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length!r} but the body has {len(body)} bytes; it must "
                "be the byte length of the JSON header at the start of the body"
            )
        split = int(header_length)
        header_bytes, binary = body[:split], memoryview(body)[split:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        hint = ""
        if header_length is None and b"}" in header_bytes and not header_bytes.rstrip().endswith(b"}"):
            hint = (
                "; a body of JSON followed by binary tensor data needs the JSON's length in bytes in the "
                "Inference-Header-Content-Length header"
            )
        raise InvalidInput(
            f"request body is not valid JSON ({exc}); send a KServe V2 inference request{hint}"
        ) from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise InvalidInput('request must be a JSON object with a non-empty "inputs" list (KServe V2 inference)')
    parameters = json_object(header.get("parameters"), '"parameters"')
    inputs: dict[str, Any] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, tensor in enumerate(header["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput(f'inputs[{i}] must be an object with a "name", "datatype", "shape" and "data"')
        name = tensor["name"]
        if name in inputs:
            raise InvalidInput(f'input "{name}" appears twice; send each input once', input=name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f'input "{name}" has no "datatype"; add one, e.g. "FP32" or "BYTES"', input=name)
        numpy_dtype(datatype, name)
        shape = check_shape(name, tensor.get("shape"))
        size = json_object(tensor.get("parameters"), f'"parameters" of input "{name}"').get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInput(
                    f'input "{name}" has binary_data_size {json_text(size)}; it must be a non-negative JSON integer, '
                    "the byte length of its data after the JSON header",
                    input=name,
                )
            if "data" in tensor:
                raise InvalidInput(
                    f'input "{name}" has both "data" and binary_data_size; send its values one way: "data" in '
                    "the JSON, or binary_data_size and the bytes after the JSON header",
                    input=name,
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f'input "{name}" declares binary_data_size {size} but only {len(binary) - offset} binary '
                    "bytes remain after the JSON header",
                    input=name,
                )
            inputs[name] = from_bytes(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            inputs[name] = from_json_data(name, datatype, shape, tensor["data"])
        else:
            raise InvalidInput(f'input "{name}" has neither "data" nor binary_data_size; send its values', input=name)
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} binary bytes follow the inputs' declared binary_data_size; they must add up "
            "to the bytes after the JSON header"
        )
    outputs = []
    requested = header.get("outputs") or []
    if not isinstance(requested, list):
        raise InvalidInput(f'"outputs" is {requested!r}; send a list of objects with a "name", or leave it out')
    for out in requested:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput('each entry of "outputs" must be an object with a "name"')
        out_parameters = json_object(out.get("parameters"), f'"parameters" of output "{out["name"]}"')
        as_bytes = out_parameters.get("binary_data")
        what = f'parameter "binary_data" of output "{out["name"]}"'
        classes = out_parameters.get("classification")
        outputs.append(
            RequestedOutput(
                out["name"],
                None if as_bytes is None else _boolean(as_bytes, what),
                0 if classes is None else class_count(out["name"], classes),
            )
        )
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f'"id" is {json_text(request_id)}; an id is a JSON string (e.g. "req-1"), or leave it out')
    binary_output = parameters.get("binary_data_output")
    check_priority(parameters.get("priority"))
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        id=request_id,
        parameters=parameters,
        binary_output_default=binary_output is not None and _boolean(binary_output, 'parameter "binary_data_output"'),
        timeout_s=_timeout_s(parameters.get("timeout"), timeout_header),
        datatypes=datatypes,
    )


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip (one or more members, as RFC 1952 allows) or zlib-wrapped deflate body, whole and checked.

    zlib's stream decoder takes a body cut short before its checksum, and ignores bytes after its end; both are
    refused, since the JSON that remains may parse and be answered as if it were what the client sent.
    """
    out: list[bytes] = []
    size, rest = 0, body
    while True:
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {encoding} data ({exc}); send it uncompressed") from None
        out.append(part)
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(
                f"decompressed request body exceeds {limit} bytes; split the request or raise --max-request-bytes",
                limit=limit,
            )
        if not inflater.eof:
            raise InvalidInput(
                f"request body is not valid {encoding} data (it ends before the end of its compressed stream); "
                "send the whole body, or send it uncompressed"
            )
        rest = inflater.unused_data
        if not rest:
            return b"".join(out)
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
            raise InvalidInput(
                f"request body is not valid {encoding} data ({len(rest)} bytes follow the end of its compressed "
                "stream); send only the compressed body, or send it uncompressed"
            )


def optional_json_object(body: bytes) -> dict[str, Any]:
    """A request body that may be empty (``{}``) and is otherwise a JSON object (the repository extension's)."""
    if not body.strip():
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON ({exc}); send {{}} or no body") from None
    if not isinstance(payload, dict):
        raise InvalidInput(f"request body is {json_text(payload)}; send a JSON object such as {{}}, or no body")
    return payload


def json_object(value: Any, what: str) -> dict[str, Any]:
    """A JSON object of the request (``None``: absent, an empty one), or a clear error naming where it is."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f'{what} is {value!r}; it must be a JSON object ({{"name": value, ...}}) or left out')
    return value


def is_ascii_digits(text: str) -> bool:
    """``str.isdigit`` takes any Unicode digit ("²", "٣"), which ``int`` then refuses or reads: HTTP means 0-9."""
    return text.isascii() and text.isdigit()


def _boolean(value: Any, what: str) -> bool:
    """A JSON boolean parameter; anything else (``"false"`` is truthy) is the client's mistake, not ``bool()``'s."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} is {json_text(value)}; it must be a JSON boolean: true or false")
    return value


def _timeout_s(parameter: Any, header: str | None) -> float | None:
    """``parameters.timeout`` is in microseconds (Triton's unit); the ``Timeout-Ms`` header in milliseconds."""
    if header is not None:
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value > 0):  # float() takes "nan", "inf" and "1e400" (inf)
            raise InvalidInput(f"Timeout-Ms header is {header!r}; send a positive, finite number of milliseconds")
        return value / 1000
    if parameter is None:
        return None
    if isinstance(parameter, bool) or not isinstance(parameter, int | float) or not 0 < parameter < math.inf:
        raise InvalidInput(
            f'parameter "timeout" is {json_text(parameter)}; send a positive, finite number of microseconds'
        )
    return float(parameter) / 1e6
