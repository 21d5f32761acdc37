"""What the load generator talks to and sends: a KServe V2 model endpoint and prebuilt request bodies.

Bodies are encoded once, before the load starts, as V2 JSON or with the binary tensor extension
(``Inference-Header-Content-Length`` + ``binary_data_size``), so the hot loop never encodes anything. Only the
standard library speaks HTTP here (metadata, readiness, one probe request); the load itself is in
:mod:`kiln.bench.loadworker`.
"""

from __future__ import annotations

import http.client
import json
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from kiln.errors import ConfigError, InvalidInput, KilnError, ModelNotFound
from kiln.types import TensorSpec

BINARY_HEADER = "Inference-Header-Content-Length"
TEXT_INPUT_DATATYPE = "BYTES"
TEXT_INPUT_SHAPES = ((-1,), (-1, 1))  # one string per row, as a vector or a column
DYNAMIC_AXIS_SIZE = 16  # a -1 axis other than the batch axis (e.g. a sequence) gets this many elements
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class V2Target:
    """One model on a KServe V2 HTTP server: ``POST {url}/v2/models/{model}[/versions/{version}]/infer``.

    ``headers`` go with every request to it (``Authorization: Bearer <key>`` for a server with API keys).
    """

    url: str
    model: str
    version: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - parsing the port is what raises on a malformed one
        except ValueError as exc:
            raise ConfigError(
                f"--url {self.url!r} is not a valid URL ({exc}); give the server's address, e.g. http://127.0.0.1:8000",
                url=self.url,
            ) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--url {self.url!r} is not an http:// or https:// URL with a host; the load generator speaks HTTP: "
                "give the server's HTTP address, e.g. http://127.0.0.1:8000",
                url=self.url,
            )

    @classmethod
    def with_key(cls, url: str, model: str, version: str | None = None, api_key: str | None = None) -> V2Target:
        """A target whose requests carry ``Authorization: Bearer <api_key>`` when a key is given."""
        return cls(url, model, version, (("Authorization", f"Bearer {api_key}"),) if api_key else ())

    @property
    def model_url(self) -> str:
        base = f"{self.url.rstrip('/')}/v2/models/{quote(self.model, safe='')}"
        return base if self.version is None else f"{base}/versions/{quote(self.version, safe='')}"

    @property
    def infer_url(self) -> str:
        return f"{self.model_url}/infer"

    def metadata(self, timeout_s: float = 10.0) -> ModelMetadata:
        """``GET /v2/models/{model}``: the model's inputs and outputs.

        Raises:
            ModelNotFound: the server answered 404.
            KilnError: the server cannot be reached or answered something else.
        """
        answer = http_request(self.model_url, headers=dict(self.headers), timeout_s=timeout_s)
        status, body = answer.status, answer.body
        if status == 404:
            raise ModelNotFound(
                f'the server at {self.url} has no model "{self.model}"'
                + (f" version {self.version}" if self.version else "")
                + f" ({_error_text(body)}); check --model against POST {self.url.rstrip('/')}/v2/repository/index",
                model=self.model,
                url=self.url,
            )
        if status != 200:
            raise KilnError(f"GET {self.model_url} answered {status}: {_error_text(body)}", url=self.model_url)
        try:
            data = json.loads(body)
            return ModelMetadata(
                name=str(data["name"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data.get("outputs", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise KilnError(
                f"GET {self.model_url} did not return V2 model metadata ({exc}); is {self.url} a KServe V2 server?",
                url=self.model_url,
            ) from exc


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def is_text(self) -> bool:
        """One BYTES input of one string per row (shape [-1] or [-1, 1]): a model that takes text (the server
        tokenizes). A BYTES input of any other shape is a tensor of strings, filled like any other tensor."""
        return (
            len(self.inputs) == 1
            and self.inputs[0].dtype == TEXT_INPUT_DATATYPE
            and tuple(self.inputs[0].shape) in TEXT_INPUT_SHAPES
        )


@dataclass(frozen=True)
class Payload:
    """One prebuilt request: its body and headers, and how many rows it carries."""

    body: bytes
    headers: tuple[tuple[str, str], ...]
    rows: int


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes
    binary_header_length: int | None  # the response's Inference-Header-Content-Length, when it has one


def http_request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, *, timeout_s: float = 10.0
) -> HttpAnswer:
    """A blocking GET (or POST with ``body``); an HTTP error status is returned, not raised.

    Raises:
        KilnError: nothing answered at ``url`` (refused, unreachable, timed out).
    """
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get(BINARY_HEADER)
            return HttpAnswer(int(response.status), bytes(response.read()), int(length) if length else None)
    except urllib.error.HTTPError as exc:
        return HttpAnswer(int(exc.code), bytes(exc.read()), None)
    except http.client.HTTPException as exc:  # something answered, but not HTTP/1.x (a gRPC port, say)
        raise KilnError(
            f"{url} did not answer HTTP ({type(exc).__name__}); --url takes the server's HTTP port (kiln serve: "
            "--http-port, 8000 by default; not its gRPC port)",
            url=url,
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KilnError(f"cannot reach {url} ({reason}); start the server or fix --url", url=url) from exc


def wait_ready(url: str, timeout_s: float = 60.0, *, poll_s: float = 0.02) -> float:
    """Poll ``GET {url}/v2/health/ready`` until it answers 200; return the seconds it took.

    Raises:
        KilnError: not ready within ``timeout_s``.
    """
    ready_url = f"{url.rstrip('/')}/v2/health/ready"
    start = time.perf_counter()
    last = "no answer"
    while (elapsed := time.perf_counter() - start) < timeout_s:
        try:
            status = http_request(ready_url, timeout_s=max(poll_s * 10, 1.0)).status
            if status == 200:
                return elapsed
            last = f"status {status}"
        except KilnError as exc:
            last = str(exc)
        time.sleep(poll_s)
    raise KilnError(f"{ready_url} was not ready within {timeout_s:g} s ({last}); check the server's log", url=url)


def probe(target: V2Target, payload: Payload, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Send one request and check the answer is a V2 inference response; return its outputs' name/datatype/shape.

    Raises:
        InvalidInput: the server refused the request as the client's mistake (a 4xx; its error is in the message).
        KilnError: the server failed to answer it (a 5xx: overloaded, still loading, or broken).
    """
    answer = http_request(target.infer_url, payload.body, dict(payload.headers + target.headers), timeout_s=timeout_s)
    if 400 <= answer.status < 500 and answer.status != 429:
        raise InvalidInput(
            f"POST {target.infer_url} answered {answer.status} to the first request ({payload.rows} rows, built "
            f"from the model's metadata): {_error_text(answer.body)} (where that names a limit, lower "
            "--rows-per-request or --texts-per-request; otherwise the server and its metadata disagree)",
            status=answer.status,
        )
    if answer.status != 200:
        raise KilnError(
            f"POST {target.infer_url} answered {answer.status} to the first request: {_error_text(answer.body)}; "
            "the server is overloaded, not ready or failing: check its log, and retry once it is ready",
            status=answer.status,
        )
    header = answer.body if answer.binary_header_length is None else answer.body[: answer.binary_header_length]
    try:
        outputs = json.loads(header)["outputs"]
        return [{k: output[k] for k in ("name", "datatype", "shape")} for output in outputs]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"POST {target.infer_url} answered 200 but not a V2 inference response ({exc})") from exc


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body[:200].decode(errors="replace")))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace") or "no body"


# --- request bodies ----------------------------------------------------------------------------------------------


def text_payloads(
    texts: Sequence[str],
    *,
    input_name: str = "text",
    texts_per_request: int = 1,
    binary: bool = False,
    outputs: Sequence[str] = (),
    limit: int = 512,
    column: bool = False,
) -> list[Payload]:
    """Requests of ``texts_per_request`` consecutive texts each (BYTES, shape [n], or [n, 1] with ``column``), at
    most ``limit`` distinct ones."""
    if texts_per_request < 1 or len(texts) < texts_per_request:
        raise InvalidInput(
            f"texts_per_request is {texts_per_request} with {len(texts)} texts; it must be between 1 and the number "
            "of texts"
        )
    count = min(limit, len(texts) // texts_per_request)
    payloads = []
    for i in range(count):
        chunk = np.array(texts[i * texts_per_request : (i + 1) * texts_per_request], dtype=object)
        if column:
            chunk = chunk.reshape(-1, 1)
        payloads.append(encode_request([(input_name, TEXT_INPUT_DATATYPE, chunk)], outputs, binary=binary))
    return payloads


def tensor_payloads(
    inputs: Sequence[TensorSpec],
    *,
    rows_per_request: int = 1,
    binary: bool = False,
    outputs: Sequence[str] = (),
    count: int = 64,
    seed: int = 0,
    feeds: dict[str, Array] | None = None,
) -> list[Payload]:
    """Requests of ``rows_per_request`` rows each: slices of ``feeds`` (held-out rows) or random rows that fit the
    signature (a -1 batch axis takes the rows; any other -1 axis gets ``DYNAMIC_AXIS_SIZE``)."""
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(count):
        tensors = []
        for spec in inputs:
            if feeds is not None and spec.name in feeds:
                source = feeds[spec.name]
                index = np.arange(i * rows_per_request, (i + 1) * rows_per_request) % len(source)
                array = np.asarray(source[index], dtype=spec.numpy_dtype)
            else:
                array = random_tensor(spec, rows_per_request, rng)
            tensors.append((spec.name, spec.dtype, array))
        payloads.append(encode_request(tensors, outputs, binary=binary))
    return payloads


def random_tensor(spec: TensorSpec, rows: int, rng: np.random.Generator) -> Array:
    """Random data of ``spec``'s dtype; the first axis holds ``rows`` when it is dynamic."""
    shape = [
        rows if axis == 0 and d == -1 else (DYNAMIC_AXIS_SIZE if d == -1 else d) for axis, d in enumerate(spec.shape)
    ]
    dtype = spec.numpy_dtype
    if spec.dtype == "BYTES":
        return np.array([f"row {i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if spec.dtype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def encode_request(tensors: Sequence[tuple[str, str, Array]], outputs: Sequence[str], *, binary: bool) -> Payload:
    """A V2 infer request: JSON ``data`` lists, or a JSON header followed by each tensor's raw bytes."""
    rows = int(tensors[0][2].shape[0]) if tensors and tensors[0][2].ndim else 1
    if not binary:
        body = {
            "inputs": [
                {"name": name, "datatype": dtype, "shape": list(array.shape), "data": _json_data(array)}
                for name, dtype, array in tensors
            ]
        }
        if outputs:
            body["outputs"] = [{"name": name} for name in outputs]
        return Payload(json.dumps(body).encode(), (("Content-Type", "application/json"),), rows)
    raw = [_raw_bytes(dtype, array) for _, dtype, array in tensors]
    header: dict[str, Any] = {
        "inputs": [
            {"name": name, "datatype": dtype, "shape": list(array.shape), "parameters": {"binary_data_size": len(data)}}
            for (name, dtype, array), data in zip(tensors, raw, strict=True)
        ]
    }
    if outputs:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": True}} for name in outputs]
    header_bytes = json.dumps(header).encode()
    headers = (("Content-Type", "application/octet-stream"), (BINARY_HEADER, str(len(header_bytes))))
    return Payload(header_bytes + b"".join(raw), headers, rows)


def _json_data(array: Array) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
    return list(flat.tolist())


def _raw_bytes(datatype: str, array: Array) -> bytes:
    """Little-endian, row-major; BYTES elements as a 4-byte little-endian length followed by the bytes."""
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    return bytes(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
