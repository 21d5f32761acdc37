"""The plain baseline: FastAPI + uvicorn + ONNX Runtime, no batching, one request -> tokenize -> session.run.

This is the server people write today (and the one LitServe's benchmarks compare against): the blocking model
call runs in FastAPI's thread pool, as FastAPI's documentation recommends, one request at a time per thread. It
speaks enough KServe V2 for a V2 client to load it: server ready/live, model metadata and ready, and infer with
and without ``/versions/{v}``, in JSON or with the binary tensor extension (so ``kiln bench --url --binary``
and ``tritonclient`` work against it too).

Text artifacts take input ``text`` (BYTES, shape [n]) and tokenize with the artifact's tokenizer; tensor
artifacts take their signature's inputs as they are.

    python bench/serve_fastapi_baseline.py kiln-repo/minilm/1 --port 8100
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from kiln import artifact as artifacts
from kiln.runtime import OrtEngine, text_encoder_for
from kiln.types import V2_TO_NUMPY, TensorSpec

BINARY_HEADER = "Inference-Header-Content-Length"
TEXT_INPUT = TensorSpec("text", "BYTES", (-1,))


class InferInput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


class BadRequest(Exception):
    pass


class Model:
    """One artifact behind ``predict(inputs) -> outputs``; text artifacts tokenize first."""

    def __init__(self, path: Path, intra_op_threads: int | None) -> None:
        self.artifact = artifacts.load(path)
        engine = OrtEngine(self.artifact.model_path, intra_op_threads=intra_op_threads)
        self.engine = engine
        self.text = self.artifact.manifest.preprocessing.get("kind") == "text"
        self.encoder = text_encoder_for(self.artifact, engine) if self.text else None
        signature = self.artifact.manifest.signature
        self.inputs = (TEXT_INPUT,) if self.text else signature.inputs
        self.outputs = (signature.outputs[0],) if self.text else signature.outputs

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return str(self.artifact.version)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
        }

    def predict(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        expected = {spec.name for spec in self.inputs}
        if set(inputs) != expected:
            raise BadRequest(f"inputs are {sorted(inputs)}; model {self.name} takes {sorted(expected)}")
        if self.encoder is not None:
            texts = [v.decode() if isinstance(v, bytes) else str(v) for v in inputs["text"].reshape(-1)]
            if not texts:
                raise BadRequest("input text holds no strings; send at least one")
            return {self.outputs[0].name: self.encoder.encode(texts, batch_size=len(texts))}
        feeds = {spec.name: inputs[spec.name].astype(spec.numpy_dtype, copy=False) for spec in self.inputs}
        return self.engine.run(feeds)


def decode_inputs(request: InferRequest, raw: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """Numpy arrays from JSON ``data`` or from the binary section after the JSON header."""
    arrays, offset = {}, 0
    for item in request.inputs:
        if item.datatype not in V2_TO_NUMPY:
            raise BadRequest(f"input {item.name} has datatype {item.datatype}, which is not a V2 datatype")
        size = (item.parameters or {}).get("binary_data_size")
        if size is not None:
            chunk, offset = raw[offset : offset + int(size)], offset + int(size)
            arrays[item.name] = _from_bytes(item.datatype, chunk).reshape(item.shape)
        elif item.data is not None:
            dtype = object if item.datatype == "BYTES" else V2_TO_NUMPY[item.datatype]
            arrays[item.name] = np.asarray(item.data, dtype=dtype).reshape(item.shape)
        else:
            raise BadRequest(f"input {item.name} has neither data nor binary_data_size")
    return arrays


def _from_bytes(datatype: str, chunk: bytes) -> np.ndarray[Any, Any]:
    if datatype != "BYTES":
        return np.frombuffer(chunk, dtype=np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<"))
    items, i = [], 0
    while i < len(chunk):
        (length,) = struct.unpack_from("<I", chunk, i)
        items.append(chunk[i + 4 : i + 4 + length])
        i += 4 + length
    return np.array(items, dtype=object)


def encode_response(model: Model, request: InferRequest, outputs: dict[str, np.ndarray[Any, Any]]) -> Response:
    wanted = {o.name: bool((o.parameters or {}).get("binary_data")) for o in request.outputs or []}
    names = [name for name in outputs if not wanted or name in wanted]
    datatypes = {spec.name: spec.dtype for spec in model.outputs}
    entries, raw = [], []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatypes.get(name, "FP32"), "shape": list(array.shape)}
        if wanted.get(name):
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    if not raw:
        return JSONResponse(body)
    header = json.dumps(body).encode()
    return Response(
        header + b"".join(raw), media_type="application/octet-stream", headers={BINARY_HEADER: str(len(header))}
    )


def build_app(model: Model) -> FastAPI:
    app = FastAPI(title=f"baseline: {model.name}", docs_url=None, redoc_url=None, openapi_url=None)

    def find(name: str, version: str | None) -> Model | None:
        return model if name == model.name and version in (None, model.version) else None

    def not_found(name: str, version: str | None) -> JSONResponse:
        what = f"model {name}" + (f" version {version}" if version else "")
        return JSONResponse({"error": f"{what} is not served here; this server serves {model.name}"}, status_code=404)

    @app.get("/v2/health/live")
    @app.get("/v2/health/ready")
    async def health() -> dict[str, bool]:
        return {"live": True, "ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "fastapi-baseline", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Any:
        found = find(name, version)
        return found.metadata() if found else not_found(name, version)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Any:
        return {"name": name, "ready": True} if find(name, version) else not_found(name, version)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        found = find(name, version)
        if found is None:
            return not_found(name, version)
        body = await request.body()
        header_length = request.headers.get(BINARY_HEADER)
        split = int(header_length) if header_length else len(body)
        try:
            parsed = InferRequest.model_validate_json(body[:split])
            inputs = decode_inputs(parsed, body[split:])
            outputs = await run_in_threadpool(found.predict, inputs)
        except (BadRequest, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return encode_response(found, parsed, outputs)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="A Kiln version directory (or model directory: latest version).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--intra-op-threads", type=int, default=None, help="ORT threads (default: Kiln's choice).")
    args = parser.parse_args()
    app = build_app(Model(args.artifact, args.intra_op_threads))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
