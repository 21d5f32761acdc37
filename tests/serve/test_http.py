"""kiln serve over HTTP, driven by the reference client (``tritonclient.http``) and by raw HTTP for bad input.

The server is the real one (data plane, batcher, Starlette app under uvicorn) on a free port; see conftest.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import artifact as artifacts
from kiln.config import ServeSettings
from kiln.errors import ConfigError
from tests.helpers import assert_top_classes

Array = np.ndarray[Any, Any]


def expected(x: Array, weights: tuple[Array, Array]) -> Array:
    logits = x @ weights[0] + weights[1]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    """A raw POST; returns (status, headers, parsed JSON body) whatever the status."""
    request = urllib.request.Request(f"http://{url}{path}", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def infer_body(data: list[Any], shape: list[int], name: str = "input", datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}).encode()


def with_fields(**fields: Any) -> bytes:
    """A valid one-row request, with ``parameters`` (of its input) or ``outputs`` (of the request) set as given."""
    tensor: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    body: dict[str, Any] = {"inputs": [tensor]}
    if "parameters" in fields:
        tensor["parameters"] = fields["parameters"]
    if "outputs" in fields:
        body["outputs"] = fields["outputs"]
    return json.dumps(body).encode()


@pytest.fixture
def tiny_server(start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact) -> Any:
    return start_server(tiny_artifact.repository, ServeSettings(max_rows_per_request=64), http=True)


def test_health_metadata_config_and_index_through_tritonclient(tiny_server: Any) -> None:
    client = httpclient.InferenceServerClient(tiny_server.http_url)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "7")
    model = client.get_model_metadata("tiny")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [4]
    assert "api_keys" not in config["parameters"]["kiln_settings"]["string_value"]
    index = client.get_model_repository_index()
    assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in index


@pytest.mark.parametrize("binary", [False, True])
def test_infer_json_and_binary_match_numpy(tiny_server: Any, tiny_weights: tuple[Array, Array], binary: bool) -> None:
    client = httpclient.InferenceServerClient(tiny_server.http_url)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    for version in ("", "1"):
        result = client.infer("tiny", [tensor], model_version=version, outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected(x, tiny_weights), rtol=1e-5)
        assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses_through_tritonclient(
    tiny_server: Any, tiny_weights: tuple[Array, Array], algorithm: str
) -> None:
    client = httpclient.InferenceServerClient(tiny_server.http_url)
    x = np.random.default_rng(2).normal(size=(7, 4)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        "tiny", [tensor], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(x, tiny_weights), rtol=1e-5)


def test_a_compressed_body_cut_short_or_followed_by_other_bytes_is_a_400(
    start_server: Callable[..., Any], tiny_artifact: Any
) -> None:
    # zlib's stream decoder took both: a gzip body without its checksum, or with bytes after its end, was answered
    import gzip
    import zlib

    server = start_server(tiny_artifact.repository, ServeSettings(max_request_bytes=4096), http=True)
    body = with_fields()
    packed = gzip.compress(body)

    def send(data: bytes, encoding: str = "gzip") -> tuple[int, Any]:
        code, _, payload = post(server.http_url, "/v2/models/tiny/infer", data, {"Content-Encoding": encoding})
        return code, payload

    assert send(packed)[0] == 200
    assert send(gzip.compress(body[:20]) + gzip.compress(body[20:]))[0] == 200  # two members, as RFC 1952 allows
    code, payload = send(packed[:-8])  # the CRC-32 and size trailer cut off
    assert code == 400 and "it ends before the end of its compressed stream" in payload["error"]
    code, payload = send(packed + b"junk")
    assert code == 400 and "4 bytes follow the end of its compressed stream" in payload["error"]
    code, payload = send(zlib.compress(body) + b"\x1f\x8b", "deflate")
    assert code == 400 and "2 bytes follow" in payload["error"]
    code, payload = send(gzip.compress(b" " * 100_000))  # 100 kB of JSON whitespace from 130 bytes on the wire
    assert code == 413 and "decompressed request body exceeds 4096 bytes" in payload["error"]
    assert "or raise --max-request-bytes" in payload["error"]  # the fix, as the declared-size refusal names it


LABELS = ["setosa", "versicolor", "virginica"]


@pytest.mark.parametrize("binary", [False, True])
def test_classification_extension_returns_the_top_classes_with_the_artifacts_labels(
    start_server: Callable[..., Any],
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
    tiny_weights: tuple[Array, Array],
    binary: bool,
) -> None:
    artifacts.write(repository, make_manifest(postprocessing={"labels": LABELS}), tiny_onnx_model)
    server = start_server(repository, ServeSettings(), http=True)
    client = httpclient.InferenceServerClient(server.http_url)
    assert "classification" in client.get_server_metadata()["extensions"]
    x = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    for count in (1, 2, 3):
        requested = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=count)]
        result = client.infer("tiny", [tensor], outputs=requested)
        assert result.get_output("probabilities")["datatype"] == "BYTES"
        assert_top_classes(result.as_numpy("probabilities"), expected(x, tiny_weights), count, LABELS)
    # more classes than the model has: all of them, as Triton answers
    requested = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=7)]
    assert client.infer("tiny", [tensor], outputs=requested).as_numpy("probabilities").shape == (6, 3)


def test_classification_without_labels_and_bad_class_counts(
    tiny_server: Any, tiny_weights: tuple[Array, Array]
) -> None:
    x = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]]
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": x}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    code, _, payload = post(tiny_server.http_url, "/v2/models/tiny/infer", json.dumps(body).encode())
    assert code == 200
    out = payload["outputs"][0]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 2])
    got = np.array(out["data"], dtype=np.object_).reshape(2, 2)
    assert_top_classes(got, expected(np.array(x, np.float32), tiny_weights), 2, [])
    for value in (0, -2, "2", True, 1.5):
        body["outputs"] = [{"name": "probabilities", "parameters": {"classification": value}}]
        code, _, payload = post(tiny_server.http_url, "/v2/models/tiny/infer", json.dumps(body).encode())
        assert (code, set(payload)) == (400, {"error"})
        assert 'parameter "classification" of output "probabilities" is' in payload["error"]
        assert "a positive integer" in payload["error"]


def test_concurrent_uneven_requests_are_each_answered_exactly(
    tiny_server: Any, tiny_weights: tuple[Array, Array]
) -> None:
    # that queued requests of uneven rows merge into batches and split back is tested over gRPC, where the one
    # instance is held busy so that they surely queue (test_grpc.py); here: many concurrent HTTP calls, each exact
    rng = np.random.default_rng(2)
    requests = [rng.normal(size=(int(rows), 4)).astype(np.float32) for rows in rng.integers(1, 9, size=60)]

    def call(x: Array) -> Array:
        client = httpclient.InferenceServerClient(tiny_server.http_url)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        out: Array = client.infer("tiny", [tensor]).as_numpy("probabilities")
        return out

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, requests))
    for x, result in zip(requests, results, strict=True):
        assert result.shape == (len(x), 3)
        np.testing.assert_allclose(result, expected(x, tiny_weights), rtol=1e-5)
    stats = httpclient.InferenceServerClient(tiny_server.http_url).get_inference_statistics("tiny")
    entry = stats["model_stats"][0]
    assert entry["inference_count"] == sum(len(x) for x in requests)
    assert entry["inference_stats"]["success"]["count"] == len(requests)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (infer_body([1, 2, 3, 4], [1, 4], name="inptu"), 400, r'input "inptu" is not an input .*did you mean "input"'),
        (infer_body([1, 2, 3, 4], [1, 4], datatype="FP64"), 400, r'input "input" has datatype FP64; .* expects FP32'),
        (infer_body([1, 2, 3], [1, 3]), 400, r'input "input" has shape \[1, 3\]; model "tiny" expects \[-1, 4\]'),
        (infer_body([1, 2, 3], [1, 4]), 400, r"has 3 elements but shape \[1, 4\] needs 4"),
        (infer_body([0.0] * 4 * 65, [65, 4]), 400, r"at most 64 rows per request; split the request"),
        (b"{not json", 400, r"not valid JSON"),
        (b'{"inputs": []}', 400, r'non-empty "inputs" list'),
        (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4]}]}).encode(), 400, "neither"),
        (with_fields(parameters=[1]), 400, r'"parameters" of input "input" is \[1\]; it must be a JSON object'),
        (with_fields(outputs=5), 400, r'"outputs" is 5; send a list of objects with a "name"'),
        (
            with_fields(outputs=[{"name": "probabilities", "parameters": "b"}]),
            400,
            r'"parameters" of output "probabilities" is \'b\'; it must be a JSON object',
        ),
        (
            with_fields(
                outputs=[{"name": "probabilities"}, {"name": "probabilities", "parameters": {"classification": 1}}]
            ),
            400,
            r'output "probabilities" is requested twice; list each output once',
        ),
    ],
)
def test_bad_requests_get_a_4xx_with_a_json_error_that_names_the_value(
    tiny_server: Any, body: bytes, status: int, message: str
) -> None:
    code, _, payload = post(tiny_server.http_url, "/v2/models/tiny/infer", body)
    assert code == status
    assert set(payload) == {"error"}
    assert re.search(message, payload["error"]), payload["error"]


def test_binary_data_output_applies_to_listed_outputs_that_do_not_say(tiny_server: Any) -> None:
    # Triton's binary extension: the request's binary_data_output is the default; an output's own binary_data wins
    def response(outputs: list[dict[str, Any]]) -> tuple[Any, bytes]:  # (headers, case-insensitive; body)
        tensor = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
        body = {"inputs": [tensor], "outputs": outputs, "parameters": {"binary_data_output": True}}
        url = f"http://{tiny_server.http_url}/v2/models/tiny/infer"
        with urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode()), timeout=30) as r:
            return r.headers, r.read()

    headers, body = response([{"name": "probabilities"}])
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 12} and len(body) == length + 12
    headers, body = response([{"name": "probabilities", "parameters": {"binary_data": False}}])
    assert headers.get("Inference-Header-Content-Length") is None and len(json.loads(body)["outputs"][0]["data"]) == 3


def test_unknown_model_version_and_route_are_404s_with_suggestions(tiny_server: Any) -> None:
    body = infer_body([1, 2, 3, 4], [1, 4])
    code, _, payload = post(tiny_server.http_url, "/v2/models/tiyn/infer", body)
    assert code == 404 and 'did you mean "tiny"' in payload["error"]
    code, _, payload = post(tiny_server.http_url, "/v2/models/tiny/versions/9/infer", body)
    assert code == 404 and "no loaded version 9" in payload["error"]
    code, _, payload = post(tiny_server.http_url, "/v2/modles/tiny/infer", body)
    assert code == 404 and "no route" in payload["error"]
    # a trailing slash was a 307 with an empty body, to a Location built from the client's Host header
    code, headers, payload = post(tiny_server.http_url, "/v2/models/tiny/infer/", body, {"Host": "elsewhere.example"})
    assert code == 404 and "location" not in {k.lower() for k in headers}
    assert (
        payload["error"] == "no route for POST /v2/models/tiny/infer/; drop the trailing slash (/v2/models/tiny/infer)"
    )


def test_binary_header_errors_and_oversized_bodies(start_server: Callable[..., Any], tiny_artifact: Any) -> None:
    server = start_server(tiny_artifact.repository, ServeSettings(max_request_bytes=2048), http=True)
    header = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}
    ).encode()
    code, _, payload = post(
        server.http_url,
        "/v2/models/tiny/infer",
        header + b"\0" * 12,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert code == 400 and "binary_data_size 16 but only 12" in payload["error"]
    code, _, payload = post(server.http_url, "/v2/models/tiny/infer", b"x" * 4096)
    assert code == 413 and "at most 2048 bytes" in payload["error"]


def test_api_keys_and_admin_endpoints(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact, tiny_onnx_model: Path, make_manifest: Any
) -> None:
    server = start_server(tiny_artifact.repository, ServeSettings(api_keys=("s3cret",)), http=True)
    body = infer_body([1, 2, 3, 4], [1, 4])
    code, headers, payload = post(server.http_url, "/v2/models/tiny/infer", body)
    assert code == 401 and "Authorization: Bearer" in payload["error"] and headers["www-authenticate"] == "Bearer"
    code, _, payload = post(server.http_url, "/v2/models/tiny/infer", body, {"Authorization": "Bearer wrong"})
    assert code == 401 and payload["error"].startswith("an unknown key was sent")
    # the key without its scheme was "no key was sent"; the message must not echo the header (it holds the key)
    code, _, payload = post(server.http_url, "/v2/models/tiny/infer", body, {"Authorization": "s3cret"})
    assert code == 401 and 'not in the form "Bearer <key>"' in payload["error"] and "s3cret" not in payload["error"]
    code, _, _ = post(server.http_url, "/v2/models/tiny/infer", body, {"Authorization": "Bearer s3cret"})
    assert code == 200
    code, _, payload = post(
        server.http_url, "/v2/repository/models/tiny/unload", b"", {"Authorization": "Bearer s3cret"}
    )
    assert code == 403 and "--admin" in payload["error"]

    admin = start_server(
        tiny_artifact.repository, ServeSettings(admin_enabled=True, admin_keys=("root-key",)), http=True
    )
    client = httpclient.InferenceServerClient(admin.http_url)
    with pytest.raises(InferenceServerException, match="no key was sent; this endpoint needs an admin key"):
        client.unload_model("tiny")
    both = start_server(
        tiny_artifact.repository,
        ServeSettings(api_keys=("s3cret",), admin_enabled=True, admin_keys=("root-key",)),
        http=True,
    )
    code, _, payload = post(both.http_url, "/v2/repository/models/tiny/unload", b"", {"Authorization": "Bearer s3cret"})
    assert code == 401 and "an API key was sent, not an admin key" in payload["error"]
    code, headers, payload = post(both.http_url, "/v2/health/ready", b"")  # GET only
    assert code == 405 and payload["error"].endswith("; use GET or HEAD") and "GET" in headers["allow"]
    auth = {"Authorization": "Bearer root-key"}
    client.unload_model("tiny", headers=auth)
    assert not client.is_model_ready("tiny")
    code, _, payload = post(admin.http_url, "/v2/models/tiny/infer", body)
    assert code == 404 and "not loaded" in payload["error"]
    artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model)  # version 2 appears on disk
    client.load_model("tiny", headers=auth)
    assert client.get_model_metadata("tiny")["versions"] == ["2"]


def test_repository_load_refuses_parameters_it_would_ignore_as_grpc_does(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact
) -> None:
    settings = ServeSettings(admin_enabled=True, admin_keys=("root-key",))
    server = start_server(tiny_artifact.repository, settings, http=True)
    auth = {"Authorization": "Bearer root-key"}

    def admin(path: str, body: bytes) -> tuple[int, Any]:
        code, _, payload = post(server.http_url, f"/v2/repository/models/tiny/{path}", body, auth)
        return code, payload

    code, payload = admin("load", json.dumps({"parameters": {"config": "{}"}}).encode())
    assert code == 400 and 'parameter "config" of load is not supported' in payload["error"]
    assert admin("load", b"[1]")[0] == 400
    assert admin("load", b"")[0] == 200  # no body, or {} (tritonclient's), is a plain load
    assert admin("load", b"{}")[0] == 200
    assert (
        admin("unload", json.dumps({"parameters": {"unload_dependents": False}}).encode())[0] == 200
    )  # tritonclient's


def test_requests_refused_while_decoding_count_as_failures_by_reason(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact
) -> None:
    # they never reached the data plane's infer(): bad JSON, bad binary data and a body too large went uncounted
    server = start_server(tiny_artifact.repository, ServeSettings(max_request_bytes=1000), http=True)
    assert post(server.http_url, "/v2/models/tiny/infer", b"{not json")[0] == 400
    assert post(server.http_url, "/v2/models/tiny/infer", b"{}", {"Inference-Header-Content-Length": "9"})[0] == 400
    assert post(server.http_url, "/v2/models/tiny/infer", b" " * 1001)[0] == 413
    assert post(server.http_url, "/v2/models/nope/infer", b"{not json")[0] == 404  # no model: nothing to count in
    with urllib.request.urlopen(f"http://{server.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'kiln_request_failures_total{model="tiny",reason="invalidinput",version="1"} 2.0' in text
    assert 'kiln_request_failures_total{model="tiny",reason="payloadtoolarge",version="1"} 1.0' in text
    assert 'kiln_request_duration_seconds_count{model="tiny",outcome="failure",version="1"} 3.0' in text


def test_metrics_expose_histograms_by_model_and_version(tiny_server: Any) -> None:
    for _ in range(3):
        assert post(tiny_server.http_url, "/v2/models/tiny/infer", infer_body([1, 2, 3, 4], [1, 4]))[0] == 200
    post(tiny_server.http_url, "/v2/models/tiny/infer", infer_body([1], [1, 1]))
    with urllib.request.urlopen(f"http://{tiny_server.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'kiln_request_duration_seconds_count{model="tiny",outcome="success",version="1"} 3.0' in text
    assert 'kiln_request_duration_seconds_count{model="tiny",outcome="failure",version="1"} 1.0' in text
    assert 'kiln_request_failures_total{model="tiny",reason="invalidinput",version="1"} 1.0' in text
    for family in (
        "kiln_queue_duration_seconds_bucket",
        "kiln_compute_duration_seconds_bucket",
        "kiln_batch_size_rows",
    ):
        assert f"{family}" in text and 'model="tiny"' in text
    assert 'kiln_queue_depth_rows{model="tiny",version="1"} 0.0' in text


@pytest.mark.slow
def test_minilm_text_over_http_batched_equals_the_in_process_encoder(
    start_server: Callable[..., Any], minilm_artifact: artifacts.Artifact
) -> None:
    from kiln.data import english_corpus
    from kiln.runtime import OrtEngine, text_encoder_for

    server = start_server(minilm_artifact.repository, ServeSettings(), http=True)
    encoder = text_encoder_for(minilm_artifact, OrtEngine(minilm_artifact.model_path))
    texts = english_corpus(48, offset=1200)
    requests = [texts[i : i + n] for i, n in zip(range(0, 48, 4), [1, 3, 4, 2] * 3, strict=True)]

    def call(batch: list[str]) -> Array:
        client = httpclient.InferenceServerClient(server.http_url)
        tensor = httpclient.InferInput("text", [len(batch)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in batch], dtype=np.object_), binary_data=True)
        out: Array = client.infer("minilm", [tensor]).as_numpy("sentence_embedding")
        return out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, requests))
    for batch, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result, encoder.encode(batch), atol=1e-4)

    ids = encoder.tokenizer.encode(texts[:2])
    feeds = encoder.tokenizer.pad(ids, [s.name for s in encoder.engine.inputs])
    body = {
        "inputs": [
            {"name": name, "datatype": "INT64", "shape": list(array.shape), "data": array.reshape(-1).tolist()}
            for name, array in feeds.items()
        ]
    }
    code, _, payload = post(server.http_url, "/v2/models/minilm/infer", json.dumps(body).encode())
    assert code == 200
    embedding = np.array(payload["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(embedding, encoder.encode(texts[:2]), atol=1e-4)

    bad = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}'
    code, _, payload = post(
        server.http_url,
        "/v2/models/minilm/infer",
        bad + b"\x02\0\0\0\xff\xfe",
        {"Inference-Header-Content-Length": str(len(bad))},
    )
    assert code == 400 and "not valid UTF-8" in payload["error"]
    code, _, payload = post(server.http_url, "/v2/models/minilm/infer", infer_body([1.0], [1], name="text"))
    assert code == 400 and "expects BYTES" in payload["error"]


def request_with(tensor: dict[str, Any] | None = None, **top: Any) -> bytes:
    """A valid one-row request with its input's fields (``tensor``) and the request's own fields (``top``) set."""
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], **(tensor or {})}],
        **top,
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        # more dimensions than numpy holds: a 500 (ValueError) before, on each of the three ways to send a tensor
        (infer_body([1.0], [1] * 65), {}, r'input "input" has 65 dimensions; this server takes at most 64'),
        (infer_body(["a"], [1] * 65, datatype="BYTES"), {}, r'input "input" has 65 dimensions'),
        (
            request_with({"shape": [1] * 65, "data": None, "parameters": {"binary_data_size": 4}}),
            {"Inference-Header-Content-Length": "-"},  # replaced by the header's length below
            r'input "input" has 65 dimensions',
        ),
        # a non-ASCII digit passes str.isdigit() but not int(): a 500 (ValueError) before
        (
            infer_body([1, 2, 3, 4], [1, 4]),
            {"Inference-Header-Content-Length": "²"},
            r"Inference-Header-Content-Length is '²'",
        ),
        # strict JSON data (Triton's): a 200 with a wrong answer, or a 500, before
        (infer_body([1, None, 3, 4], [1, 4]), {}, r'input "input" has data that is not FP32: element 1 is null'),
        (infer_body(["1", 2, 3, 4], [1, 4]), {}, r'element 0 is "1" \(a string\); FP32 data must be JSON numbers'),
        (infer_body([[1, 2], [True, 4]], [1, 4]), {}, r"element 2 is true \(a boolean\)"),
        (infer_body([1, 2, 3, 1e300], [1, 4]), {}, r"element 3 is 1e\+300, out of range for FP32"),
        (infer_body(["false"] * 4, [1, 4], datatype="BOOL"), {}, r'element 0 is "false" \(a string\); BOOL data must'),
        (infer_body([1.7, 2, 3, 4], [1, 4], datatype="INT8"), {}, r"element 0 is 1.7 \(a float\); INT8 data must"),
        # the request's id is a string (Triton's rule); it was echoed as str() of anything before
        (request_with(id=5), {}, r'"id" is 5; an id is a JSON string'),
        (request_with(id=None), {}, r'"id" is null; an id is a JSON string'),
        (request_with(id={"a": 1}), {}, r'"id" is \{"a":1\}; an id is a JSON string'),
        # boolean parameters are JSON booleans: "false" and "no" were truthy before
        (
            request_with(parameters={"binary_data_output": "false"}),
            {},
            r'"binary_data_output" is "false"; .* true or false',
        ),
        (
            request_with(outputs=[{"name": "probabilities", "parameters": {"binary_data": "no"}}]),
            {},
            r'parameter "binary_data" of output "probabilities" is "no"; .* true or false',
        ),
        # binary_data_size is a non-negative JSON integer, and a tensor sends its values one way only
        (
            request_with({"data": None, "parameters": {"binary_data_size": True}}),
            {"Inference-Header-Content-Length": "-"},
            r'input "input" has binary_data_size true; it must be a non-negative JSON integer',
        ),
        (
            request_with({"data": None, "parameters": {"binary_data_size": "16"}}),
            {"Inference-Header-Content-Length": "-"},
            r'binary_data_size "16"; it must be a non-negative JSON integer',
        ),
        (
            request_with({"data": None, "parameters": {"binary_data_size": 16.0}}),
            {"Inference-Header-Content-Length": "-"},
            r"binary_data_size 16.0; it must be a non-negative JSON integer",
        ),
        (
            request_with({"parameters": {"binary_data_size": 16}}),
            {"Inference-Header-Content-Length": "-"},
            r'input "input" has both "data" and binary_data_size; send its values one way',
        ),
        # a deadline is a finite number: nan, inf and 1e400 were taken before
        (
            infer_body([1, 2, 3, 4], [1, 4]),
            {"Timeout-Ms": "nan"},
            r"Timeout-Ms header is 'nan'; send a positive, finite",
        ),
        (infer_body([1, 2, 3, 4], [1, 4]), {"Timeout-Ms": "inf"}, r"Timeout-Ms header is 'inf'"),
        (infer_body([1, 2, 3, 4], [1, 4]), {"Timeout-Ms": "1e400"}, r"Timeout-Ms header is '1e400'"),
        (request_with(parameters={"timeout": True}), {}, r'parameter "timeout" is true; send a positive'),
        # schedule_policy's priority is a uint64: "high", -1 and 1.5 were taken
        (request_with(parameters={"priority": "high"}), {}, r'parameter "priority" is "high"; a priority is a whole'),
        (request_with(parameters={"priority": -1}), {}, r'parameter "priority" is -1; a priority is a whole'),
        # binary tensor data without the header that says where the JSON ends: the message says which header
        (
            request_with({"data": None, "parameters": {"binary_data_size": 16}}).replace(b', "data": null', b"")
            + b"\0\1\2" * 5,
            {},
            r"not valid JSON .* Inference-Header-Content-Length header",
        ),
    ],
)
def test_malformed_requests_found_in_review_get_a_400_naming_the_value_and_the_rule(
    tiny_server: Any, body: bytes, headers: dict[str, str], message: str
) -> None:
    if headers.get("Inference-Header-Content-Length") == "-":
        body = body.replace(b', "data": null', b"")
        headers = {"Inference-Header-Content-Length": str(len(body))}
        body += b"\0" * 16
    code, _, payload = post(tiny_server.http_url, "/v2/models/tiny/infer", body, headers)
    assert (code, set(payload)) == (400, {"error"}), payload
    assert re.search(message, payload["error"]), payload["error"]


def test_valid_ids_and_boolean_parameters_still_work(tiny_server: Any) -> None:
    body = request_with(id="req-7", parameters={"binary_data_output": False, "timeout": 10_000_000})
    code, _, payload = post(tiny_server.http_url, "/v2/models/tiny/infer", body, {"Timeout-Ms": "10000"})
    assert code == 200 and payload["id"] == "req-7" and len(payload["outputs"][0]["data"]) == 3


def test_a_non_ascii_content_length_is_a_400_not_a_500() -> None:
    # the HTTP parser in front usually refuses such a header; read_body must not trust it either
    import asyncio

    from starlette.requests import Request

    from kiln.errors import InvalidInput
    from kiln.serve.http import read_body

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", "²".encode("latin-1"))]}
    with pytest.raises(InvalidInput, match=r"Content-Length is '²'; .* ASCII digits"):
        asyncio.run(read_body(Request(scope, receive), 1024, timeout_s=10.0))


def _start_partial_body(url: str, sent: bytes = b'{"inputs":', declared: int = 100) -> socket.socket:
    """A raw HTTP/1.1 infer request whose body stops after ``sent`` of the ``declared`` bytes."""
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: {url}\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + sent)
    return sock


def _failures(url: str) -> dict[str, float]:
    return _failures_of(url, "tiny")


def _failures_of(url: str, model: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(rf'kiln_request_failures_total\{{model="{model}",reason="(\w+)",version="1"\}} (\S+)', text)
    return {reason: float(value) for reason, value in found}


def test_a_body_that_stalls_part_way_gets_a_408_and_its_connection_closed(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact
) -> None:
    # it used to hold its connection, and a graceful shutdown, until the drain timeout, and then got a 500
    server = start_server(tiny_artifact.repository, ServeSettings(body_timeout_s=0.5), http=True)
    with _start_partial_body(server.http_url) as sock:
        started = time.perf_counter()
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            answer += chunk
        waited = time.perf_counter() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    message = json.loads(body)["error"]
    assert "10 bytes of the 100 its Content-Length declares came, then nothing for 0.5 s" in message
    assert "--body-timeout-s" in message
    assert 0.4 < waited < 10
    assert _failures(server.http_url) == {"body_timeout": 1.0}
    # a body that keeps arriving, however slowly, is not cut off: only a pause longer than the timeout is
    body = infer_body([1, 2, 3, 4], [1, 4])
    with _start_partial_body(server.http_url, body[:20], len(body)) as sock:
        for i in range(20, len(body), 20):
            time.sleep(0.1)
            sock.sendall(body[i : i + 20])
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_a_client_that_closes_mid_body_is_counted_as_cancelled_not_logged_as_an_internal_error(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(tiny_artifact.repository, ServeSettings(), http=True)
    with caplog.at_level(logging.DEBUG, logger="kiln.serve"):
        _start_partial_body(server.http_url).close()
        deadline = time.monotonic() + 10
        while not _failures(server.http_url) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _failures(server.http_url) == {"cancelled": 1.0}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("closed the connection after 10 bytes" in r.getMessage() for r in caplog.records)


def test_body_timeout_must_be_positive_and_finite() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"body_timeout_s.* (it must be a positive, finite number|NaN and inf)"):
            ServeSettings(body_timeout_s=bad)


def _metric(url: str, name: str, model: str = "slow") -> float:
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}\{{model="{model}",version="1"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("kiln_protocol", "pipelined"),
    [(True, False), (False, False), (True, True)],
    ids=["kiln-protocol", "uvicorn-protocol", "kiln-protocol-pipelined"],
)
def test_a_queued_request_whose_client_disconnects_leaves_the_queue_unrun(
    start_server: Callable[..., Any], slow_repo: Path, kiln_protocol: bool, pipelined: bool
) -> None:
    # it used to stay queued and run: its batch slot and compute spent on a client that was gone. Kiln's protocol
    # tells the request when its connection is lost, also when a pipelined request came after it on the connection
    # (uvicorn's own flags only the last); under uvicorn's protocol a task watches for http.disconnect.
    rows = 4096  # 0.2-0.4 s of compute a request: the queue stands while the test looks at it
    settings = ServeSettings(instances=1, batching=False, max_rows_per_request=rows, max_queue_rows=4 * rows)
    server = start_server(slow_repo, settings, http=True, kiln_protocol=kiln_protocol)
    url, ahead = server.http_url, 3
    big = infer_body([0.5] * (rows * 4), [rows, 4])
    with concurrent.futures.ThreadPoolExecutor(ahead) as pool:
        futures = [pool.submit(post, url, "/v2/models/slow/infer", big) for _ in range(ahead)]
        deadline = time.monotonic() + 30
        while _metric(url, "kiln_queue_depth_rows") < rows and time.monotonic() < deadline:
            time.sleep(0.005)  # one runs, one or two wait
        queued = _metric(url, "kiln_queue_depth_rows")
        host, port = url.rsplit(":", 1)
        body = infer_body([0.5] * 28, [7, 4])  # 7 rows: told apart from the others in the rows executed
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: {url}\r\nContent-Length: {len(body)}\r\n\r\n"
            behind = f"GET /v2/health/live HTTP/1.1\r\nHost: {url}\r\n\r\n".encode() if pipelined else b""
            sock.sendall(head.encode() + body + behind)
            while _metric(url, "kiln_queue_depth_rows") % rows != 7 and time.monotonic() < deadline:
                time.sleep(0.002)  # until it is queued
            assert _metric(url, "kiln_queue_depth_rows") % rows == 7, "the 7-row request never showed in the queue"
        assert all(future.result()[0] == 200 for future in futures)
    assert queued >= rows
    assert _metric(url, "kiln_batch_size_rows_sum") == ahead * rows  # the 7 rows never ran
    assert _failures_of(url, "slow") == {"cancelled": 1.0}


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",  # no request line
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}",  # not a length
        b"GET /v2 HTTP/1.1\r\nHo st: x\r\n\r\n",  # a space in a header name
    ],
)
def test_a_request_that_is_not_http_gets_a_json_400(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact, raw: bytes
) -> None:
    # uvicorn answered these itself, in text/plain ("Invalid HTTP request received.")
    server = start_server(tiny_artifact.repository, ServeSettings(), http=True)
    host, port = server.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower()
    assert "not valid HTTP/1.1" in json.loads(body)["error"]
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as response:
        assert response.status == 200  # the server goes on serving others
