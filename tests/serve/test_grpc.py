"""The gRPC transport (KServe V2 ``inference.GRPCInferenceService``), driven by ``tritonclient.grpc`` against a real
server on a free port: the tiny ONNX classifier of tests/conftest.py, and MiniLM for BYTES text (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from kiln import artifact as artifacts
from kiln.config import ServeSettings
from kiln.errors import ConfigError, Forbidden, InvalidInput, KilnError, ModelNotFound, Overloaded, PayloadTooLarge
from kiln.serve.grpc import STATUS, start_grpc, status_of
from kiln.serve.proto import grpc_service_pb2, model_config_pb2
from kiln.serve.proto.convert import decode_infer
from tests.helpers import assert_top_classes

if TYPE_CHECKING:
    from conftest import RunningServer  # tests/serve/conftest.py (pytest's importlib mode: no package)

Array = np.ndarray[Any, Any]
StartServer = Callable[..., "RunningServer"]
PROTO_DIR = Path(grpc_service_pb2.__file__).parent
SRC = PROTO_DIR.parents[2]
ADMIN = {"authorization": "Bearer admin-key"}


# -- helpers ------------------------------------------------------------------------------------------------------
def expected_probabilities(x: Array, weights: tuple[Array, Array]) -> Array:
    weight, bias = weights
    logits = x.astype(np.float64) @ weight + bias  # (N, 3)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def rows_of(n: int, seed: int = 0) -> Array:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def tensor(x: Array, name: str = "input", datatype: str = "FP32", shape: list[int] | None = None) -> triton.InferInput:
    entry = triton.InferInput(name, shape or list(x.shape), datatype)
    entry.set_data_from_numpy(x)
    return entry


def client_of(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.grpc_url)


def failure(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


@pytest.fixture
def tiny_server(tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer) -> RunningServer:
    return start_server(repository, ServeSettings())


# -- the protocol: Kiln's proto is Triton's, field for field ------------------------------------------------------
def _messages(container: FileDescriptor | Descriptor) -> list[Descriptor]:
    found: list[Descriptor] = []
    children = (
        container.message_types_by_name if isinstance(container, FileDescriptor) else container.nested_types_by_name
    )
    for message in children.values():
        found.append(message)
        found.extend(_messages(message))
    return found


def _enums(file: FileDescriptor) -> list[EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())
    for message in _messages(file):
        enums.extend(message.enum_types)
    return enums


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(grpc_service_pb2.DESCRIPTOR, triton_pb2.DESCRIPTOR), (model_config_pb2.DESCRIPTOR, triton_config_pb2.DESCRIPTOR)],
    ids=["grpc_service", "model_config"],
)
def test_every_declared_message_field_and_enum_matches_tritonclient(
    ours: FileDescriptor, theirs: FileDescriptor
) -> None:
    assert ours.package == theirs.package == "inference"
    pool = theirs.pool
    checked = 0
    for message in _messages(ours):
        reference = pool.FindMessageTypeByName(message.full_name)
        assert message.GetOptions().map_entry == reference.GetOptions().map_entry, message.full_name
        for field in message.fields:
            where = f"{message.full_name}.{field.name}"
            assert field.name in reference.fields_by_name, f"{where} is not in Triton's protocol"
            other = reference.fields_by_name[field.name]
            assert (field.number, field.type, field.label) == (other.number, other.type, other.label), where
            assert (field.message_type and field.message_type.full_name) == (
                other.message_type and other.message_type.full_name
            ), where
            assert (field.enum_type and field.enum_type.full_name) == (other.enum_type and other.enum_type.full_name), (
                where
            )
            assert (field.containing_oneof and field.containing_oneof.name) == (
                other.containing_oneof and other.containing_oneof.name
            ), where
            checked += 1
    for enum in _enums(ours):
        reference_enum = pool.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {
            v.name: v.number for v in reference_enum.values if v.name in enum.values_by_name
        }, enum.full_name
    assert checked > 40


def test_service_declares_tritons_rpcs_with_the_same_types() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)
    assert {m.name for m in ours.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's Python generator drops the derived ``json_name`` of each field; a descriptor set keeps it."""

    def strip(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            strip(nested)

    for message in file.message_type:
        strip(message)
    return file


def test_shipped_modules_are_generated_from_the_shipped_proto_files(tmp_path: Path) -> None:
    """The *_pb2.py files embed exactly what protoc makes of the .proto files (run `make proto` after an edit)."""
    out = tmp_path / "set.pb"
    protos = [str(PROTO_DIR / name) for name in ("model_config.proto", "grpc_service.proto")]
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(SRC), f"--descriptor_set_out={out}", *protos]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    generated = {
        f.name: _without_json_names(f) for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    }
    for module in (model_config_pb2, grpc_service_pb2):
        shipped = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert shipped == generated[module.DESCRIPTOR.name], f"{module.__name__} is stale: run `make proto`"


def test_kiln_messages_live_in_their_own_pool_beside_tritonclients() -> None:
    assert grpc_service_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert triton_pb2.DESCRIPTOR.pool is descriptor_pool.Default()
    ours = grpc_service_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[b"\x00" * 16])
    ours.parameters["timeout"].int64_param = 5
    theirs = triton_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.parameters["timeout"].int64_param) == ("tiny", 5)


# -- health, metadata, configuration, statistics, repository ------------------------------------------------------
def test_health_and_metadata(tiny_server: RunningServer) -> None:
    client = client_of(tiny_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("nope")

    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "kiln"
    assert {"model_configuration", "statistics", "model_repository"} <= set(server["extensions"])

    model = client.get_model_metadata("tiny", as_json=True)
    assert (model["name"], model["versions"], model["platform"]) == ("tiny", ["1"], "onnxruntime_onnx")
    # MessageToJson writes int64 as strings
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "3"]}]
    client.close()


def test_model_config_is_the_data_planes_in_tritons_message(tiny_server: RunningServer) -> None:
    client = client_of(tiny_server)
    config = client.get_model_config("tiny").config  # a tritonclient ModelConfig message
    assert (config.name, config.platform, config.backend) == ("tiny", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", triton_config_pb2.TYPE_FP32, [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probabilities", [3])]
    assert config.version_policy.latest.num_versions == 1
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.instance_group[0].kind == triton_config_pb2.ModelInstanceGroup.KIND_CPU
    assert "max_batch_size" in config.parameters["kiln_settings"].string_value
    client.close()


def test_a_tensor_of_the_batch_axis_alone_is_dims_1_reshaped_to_nothing_as_triton_writes_it(
    tmp_path: Path, start_server: StartServer
) -> None:
    # a scikit-learn classifier's label output is [-1]: the config said dims [1] alone, which Triton reads as
    # [-1, 1], against the metadata's [-1]
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from kiln.export import export

    x, y = load_iris(return_X_y=True)
    export(LogisticRegression(max_iter=500).fit(x, y), out=tmp_path, name="iris", example_inputs=x[:8])
    client = client_of(start_server(tmp_path, ServeSettings()))
    assert [(o.name, o.shape) for o in client.get_model_metadata("iris").outputs] == [
        ("label", [-1]),
        ("probabilities", [-1, 3]),
    ]
    outputs = {o.name: o for o in client.get_model_config("iris").config.output}
    assert list(outputs["label"].dims) == [1] and outputs["label"].HasField("reshape")
    assert list(outputs["label"].reshape.shape) == []
    assert list(outputs["probabilities"].dims) == [3] and not outputs["probabilities"].HasField("reshape")
    client.close()


def test_statistics_count_rows_and_batches(tiny_server: RunningServer) -> None:
    client = client_of(tiny_server)
    before = client.get_inference_statistics("tiny").model_stats[0]
    assert (before.name, before.version, before.inference_count) == ("tiny", "1", 0)
    client.infer("tiny", [tensor(rows_of(3))])
    client.infer("tiny", [tensor(rows_of(2))])
    stats = client.get_inference_statistics("tiny").model_stats[0]
    assert stats.inference_count == 5
    assert stats.inference_stats.success.count == 2
    assert stats.inference_stats.success.ns > 0
    assert sum(batch.batch_size * batch.compute_infer.count for batch in stats.batch_stats) == 5
    everything = client.get_inference_statistics().model_stats  # no name: every served model
    assert [s.name for s in everything] == ["tiny"]
    client.close()


def test_repository_index(tiny_server: RunningServer) -> None:
    client = client_of(tiny_server)
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    client.close()


# -- inference ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_infer_equals_numpy(tiny_server: RunningServer, tiny_weights: tuple[Array, Array], rows: int) -> None:
    client = client_of(tiny_server)
    x = rows_of(rows, seed=rows)
    result = client.infer(
        "tiny", [tensor(x)], outputs=[triton.InferRequestedOutput("probabilities")], request_id=f"r{rows}"
    )
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    assert got.shape == (rows, 3)
    np.testing.assert_allclose(got, expected_probabilities(x, tiny_weights), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", f"r{rows}")
    assert [o.datatype for o in response.outputs] == ["FP32"]
    client.close()


def test_infer_with_typed_contents(tiny_server: RunningServer, tiny_weights: tuple[Array, Array]) -> None:
    """Typed ``fp32_contents`` instead of raw bytes, sent with Triton's own stub and messages."""
    x = rows_of(2, seed=5)
    request = triton_pb2.ModelInferRequest(model_name="tiny", model_version="1")
    entry = request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    entry.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(tiny_server.grpc_url) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
        np.testing.assert_allclose(got, expected_probabilities(x, tiny_weights), rtol=1e-5, atol=1e-6)

        entry.contents.Clear()
        entry.contents.int64_contents.extend([1] * 8)  # the wrong field for FP32
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "int64_contents" in info.value.details()
    assert "fp32_contents" in info.value.details()
    # refused while decoding, before the data plane's infer(): still a failure of model "tiny", by reason
    failures = tiny_server.plane.metrics_text().decode()
    assert 'kiln_request_failures_total{model="tiny",reason="invalidinput",version="1"} 1.0' in failures


def test_classification_extension_returns_the_top_classes_with_the_artifacts_labels(
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
    tiny_weights: tuple[Array, Array],
    start_server: StartServer,
) -> None:
    labels = ["setosa", "versicolor", "virginica"]
    artifacts.write(repository, make_manifest(postprocessing={"labels": labels}), tiny_onnx_model)
    client = client_of(start_server(repository, ServeSettings()))
    assert "classification" in client.get_server_metadata().extensions
    x = rows_of(5, seed=3)
    result = client.infer("tiny", [tensor(x)], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
    assert result.get_output("probabilities").datatype == "BYTES"
    assert_top_classes(result.as_numpy("probabilities"), expected_probabilities(x, tiny_weights), 2, labels)
    negative = [triton.InferRequestedOutput("probabilities", class_count=-1)]
    error = failure(lambda: client.infer("tiny", [tensor(x)], outputs=negative))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert 'parameter "classification" of output "probabilities" is -1' in error.message()
    client.close()


@pytest.mark.parametrize("repo_fixture", ["per_call_repo", "per_call_int8_repo"])
def test_concurrent_uneven_requests_are_batched_and_split_back_exactly(
    repo_fixture: str, request: pytest.FixtureRequest, start_server: StartServer
) -> None:
    # One engine instance busy with a large request: the uneven requests that arrive meanwhile queue up and
    # leave together, in batches the batcher cuts by cost. 2048 rows keep the instance busy for 0.1-0.4 s on a
    # 2-core AMD EPYC, long past the time the small requests take to arrive. The model has a cost per call
    # (per_call_repo): merging must pay for the batcher to do it, and with the plain MLP (0.1-1 ms a call against
    # 0.1 ms a row) whether it paid was a matter of the noise in the learned cost. A second large request queues
    # behind the small ones: a merge must not raise the worst predicted latency in the queue, and on a loaded
    # machine the client's sends spread over a few hundred ms, so without a request behind them the oldest small
    # one, which a merge delays by a few ms, was the worst, and nothing merged.
    # The INT8 dynamic model picks its activation scales per batch, so a row's output depends on its batch-mates:
    # there the requests must run one by one, each exactly as it would alone (merged, outputs moved by ~1e-2).
    from kiln.runtime import OrtEngine

    per_call_repo: Path = request.getfixturevalue(repo_fixture)
    coupled = repo_fixture == "per_call_int8_repo"
    settings = ServeSettings(instances=1, max_batch_size=64, max_rows_per_request=2048, max_queue_rows=8192)
    server = start_server(per_call_repo, settings)
    client = client_of(server)
    reference = OrtEngine(per_call_repo / "slow" / "1" / "model.onnx", intra_op_threads=1)
    row_counts = [2048, 1, 7, 2, 5, 3, 11, 4, 6, 2048]
    inputs = {i: rows_of(n, seed=100 + i) for i, n in enumerate(row_counts)}
    results: dict[int, Array] = {}
    errors: list[Exception] = []
    done = threading.Semaphore(0)

    def callback(index: int, result: Any, error: Exception | None) -> None:
        if error is not None:
            errors.append(error)
        else:
            results[index] = result.as_numpy("probabilities")
        done.release()

    for i, x in inputs.items():
        client.async_infer("slow", [tensor(x)], lambda result, error, i=i: callback(i, result, error))
    for _ in inputs:
        assert done.acquire(timeout=60)
    assert not errors
    for i, x in inputs.items():
        assert results[i].shape == (row_counts[i], 3)
        alone = reference.run({"input": x})["probabilities"]
        np.testing.assert_allclose(results[i], alone, rtol=1e-6 if coupled else 1e-4, atol=1e-7 if coupled else 1e-6)
    stats = client.get_inference_statistics("slow").model_stats[0]
    assert stats.inference_count == sum(row_counts)
    if coupled:
        assert stats.execution_count == len(row_counts)
        assert "dynamic_batching" not in client.get_model_config("slow", as_json=True)["config"]
    else:
        assert stats.execution_count < len(row_counts)  # several requests shared a batch
    assert sum(batch.batch_size * batch.compute_infer.count for batch in stats.batch_stats) == sum(row_counts)
    # Triton counts compute_infer per request (each request of a batch took the batch's compute), as success is
    infer = stats.inference_stats
    assert infer.compute_infer.count == infer.success.count == infer.queue.count == len(row_counts)
    client.close()


def test_stream_infer_answers_each_request_and_survives_a_bad_one(
    tiny_server: RunningServer, tiny_weights: tuple[Array, Array]
) -> None:
    client = client_of(tiny_server)
    answers: dict[str, Any] = {}
    arrived = threading.Semaphore(0)

    def callback(result: Any, error: InferenceServerException | None) -> None:
        if error is not None:
            answers[f"error:{len(answers)}"] = error
        else:
            answers[result.get_response().id] = result.as_numpy("probabilities")
        arrived.release()

    client.start_stream(callback)
    inputs = {f"s{n}": rows_of(n, seed=n) for n in (1, 4, 2)}
    for request_id, x in inputs.items():
        client.async_stream_infer("tiny", [tensor(x)], request_id=request_id)
    client.async_stream_infer("tiny", [tensor(rows_of(1), name="inptu")], request_id="bad")
    for _ in range(len(inputs) + 1):
        assert arrived.acquire(timeout=30)
    client.stop_stream()
    for request_id, x in inputs.items():
        np.testing.assert_allclose(answers[request_id], expected_probabilities(x, tiny_weights), rtol=1e-5, atol=1e-6)
    [error] = [value for key, value in answers.items() if key.startswith("error:")]
    assert 'did you mean "input"' in error.message()
    client.close()


def test_http_and_grpc_serve_one_data_plane(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    import tritonclient.http as triton_http

    server = start_server(repository, ServeSettings(), http=True)
    assert server.http_url is not None
    x = rows_of(3, seed=9)
    over_grpc = client_of(server).infer("tiny", [tensor(x)]).as_numpy("probabilities")
    http_input = triton_http.InferInput("input", [3, 4], "FP32")
    http_input.set_data_from_numpy(x, binary_data=True)
    http_client = triton_http.InferenceServerClient(server.http_url)
    over_http = http_client.infer("tiny", [http_input]).as_numpy("probabilities")
    http_client.close()
    np.testing.assert_array_equal(over_grpc, over_http)
    assert client_of(server).get_inference_statistics("tiny").model_stats[0].inference_count == 6


# -- errors: the right code, and a message that names the value ---------------------------------------------------
@pytest.mark.parametrize(
    ("model", "make_input", "code", "named"),
    [
        ("tiny", lambda: tensor(rows_of(2).astype(np.float64), datatype="FP64"), "INVALID_ARGUMENT", "FP64"),
        ("tiny", lambda: tensor(np.ones((2, 5), np.float32)), "INVALID_ARGUMENT", "[2, 5]"),
        ("tiny", lambda: tensor(np.ones((2, 4, 1), np.float32)), "INVALID_ARGUMENT", "[2, 4, 1]"),
        ("tiny", lambda: tensor(rows_of(2), name="inptu"), "INVALID_ARGUMENT", 'input "inptu" is not an input'),
        ("tiny", lambda: tensor(rows_of(2), name="inptu"), "INVALID_ARGUMENT", 'did you mean "input"'),
        ("tiyn", lambda: tensor(rows_of(2)), "NOT_FOUND", 'model "tiyn"'),
        ("tiyn", lambda: tensor(rows_of(2)), "NOT_FOUND", 'did you mean "tiny"'),
    ],
    ids=["dtype", "shape", "rank", "unknown-input", "did-you-mean-input", "unknown-model", "did-you-mean-model"],
)
def test_bad_requests_get_the_right_code_and_name_the_value(
    tiny_server: RunningServer, model: str, make_input: Callable[[], triton.InferInput], code: str, named: str
) -> None:
    client = client_of(tiny_server)
    error = failure(lambda: client.infer(model, [make_input()]))
    assert error.status() == f"StatusCode.{code}"
    assert named in error.message()
    assert "Traceback" not in error.message()
    client.close()


def test_unknown_version_output_and_bad_timeout(tiny_server: RunningServer) -> None:
    client = client_of(tiny_server)
    x = tensor(rows_of(1))
    error = failure(lambda: client.infer("tiny", [x], model_version="7"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no loaded version 7" in error.message()
    error = failure(lambda: client.infer("tiny", [x], outputs=[triton.InferRequestedOutput("probabilites")]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert 'output "probabilites"' in error.message()
    assert 'did you mean "probabilities"' in error.message()
    error = failure(lambda: client.infer("tiny", [x], timeout=-5))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert 'parameter "timeout" is -5' in error.message()
    client.close()


def test_limits_rows_and_message_size(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    server = start_server(repository, ServeSettings(max_rows_per_request=8, max_request_bytes=4096))
    client = client_of(server)
    error = failure(lambda: client.infer("tiny", [tensor(rows_of(9))]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "9 rows" in error.message()
    assert "at most 8 rows" in error.message()
    too_big = np.zeros((300, 4), np.float32)  # 4800 bytes > 4096: refused by gRPC before Kiln decodes it
    error = failure(lambda: client.infer("tiny", [tensor(too_big)]))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "4096" in error.message()
    assert client.infer("tiny", [tensor(rows_of(8))]).as_numpy("probabilities").shape == (8, 3)
    client.close()


def test_overload_is_unavailable_with_retry_advice(slow_repo: Path, start_server: StartServer) -> None:
    import concurrent.futures

    server = start_server(slow_repo, ServeSettings(max_queue_rows=128, max_batch_size=64))
    request = triton_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="input", datatype="FP32", shape=[64, 4])
    request.raw_input_contents.append(rows_of(64).tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)

        def call(_: int) -> grpc.RpcError | None:
            try:
                stub.ModelInfer(request, timeout=30)
            except grpc.RpcError as error:
                return error
            return None

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(call, range(24)))
    refused = [error for error in outcomes if error is not None]
    assert refused and len(refused) < len(outcomes)
    for error in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "accepts at most 128" in error.details()
        trailing = dict(error.trailing_metadata())
        assert trailing["retry-after"] == "1"
        assert trailing["grpc-retry-pushback-ms"] == "1000"


def test_a_request_larger_than_the_whole_queue_is_told_to_split_not_to_retry(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    # it was UNAVAILABLE with a retry pushback, so a client retried a request that could never be queued
    server = start_server(repository, ServeSettings(max_queue_rows=4))
    client = client_of(server)
    error = failure(lambda: client.infer("tiny", [tensor(rows_of(5))]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        'input "input" has 5 rows; this server accepts at most 4 rows per request; split the request' in error.message()
    )
    assert client.infer("tiny", [tensor(rows_of(4))]).as_numpy("probabilities").shape == (4, 3)
    client.close()


def test_timeout_parameter_reaches_the_batcher(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    """``timeout`` is in microseconds (Triton's unit): 1 µs cannot be met, so the request is refused at once."""
    server = start_server(repository, ServeSettings())
    client = client_of(server)
    error = failure(lambda: client.infer("tiny", [tensor(rows_of(2))], timeout=1))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "timeout is 0.001 ms" in error.message()
    assert client.infer("tiny", [tensor(rows_of(2))], timeout=10_000_000).as_numpy("probabilities").shape == (2, 3)
    client.close()


def test_decode_takes_the_tighter_of_timeout_parameter_and_deadline() -> None:
    request = grpc_service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
    assert decode_infer(request, None).timeout_s is None
    assert decode_infer(request, 0.5).timeout_s == 0.5
    request.parameters["timeout"].int64_param = 2_000_000
    assert decode_infer(request, None).timeout_s == 2.0
    assert decode_infer(request, 0.5).timeout_s == 0.5
    assert decode_infer(request, 9.0).timeout_s == 2.0


def test_decode_takes_a_whole_priority_and_refuses_others() -> None:
    # schedule_policy is advertised; a priority of "urgent" was taken without a word
    from kiln.errors import InvalidInput

    request = grpc_service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
    request.parameters["priority"].uint64_param = 2
    assert decode_infer(request, None).parameters["priority"] == 2
    request.parameters["priority"].string_param = "urgent"
    with pytest.raises(InvalidInput, match=r'parameter "priority" is "urgent"; a priority is a whole number >= 0'):
        decode_infer(request, None)


def _request(datatype: str = "FP32", shape: tuple[int, ...] = (1, 4)) -> grpc_service_pb2.ModelInferRequest:
    request = grpc_service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    return request


def _raw_count_mismatch() -> grpc_service_pb2.ModelInferRequest:
    request = _request()
    request.inputs.add(name="other", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    return request


def _typed_and_raw() -> grpc_service_pb2.ModelInferRequest:
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    request.raw_input_contents.append(b"\x00" * 16)
    return request


def _typed_fp16() -> grpc_service_pb2.ModelInferRequest:
    request = _request("FP16")
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    return request


def _int8_out_of_range() -> grpc_service_pb2.ModelInferRequest:
    request = _request("INT8", (1,))
    request.inputs[0].contents.int_contents.append(300)
    return request


def _shared_memory() -> grpc_service_pb2.ModelInferRequest:
    request = _request()
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return request


def _duplicate() -> grpc_service_pb2.ModelInferRequest:
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    return request


def _classification() -> grpc_service_pb2.ModelInferRequest:
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    request.outputs.add(name="probabilities").parameters["classification"].string_param = "2"
    return request


def _short_raw() -> grpc_service_pb2.ModelInferRequest:
    request = _request()
    request.raw_input_contents.append(b"\x00" * 15)
    return request


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_raw_count_mismatch, "2 inputs but 1 raw_input_contents"),
        (_typed_and_raw, "both typed contents and raw_input_contents"),
        (_typed_fp16, "FP16, which has no typed contents field"),
        (_int8_out_of_range, "out of range for INT8"),
        (_shared_memory, 'shared memory region "region0"'),
        (_duplicate, 'input "input" appears twice'),
        (_classification, 'parameter "classification" of output "probabilities" is "2"; it is the number'),
        (_short_raw, "has 15 bytes of binary data but shape [1, 4] of FP32 needs 16"),
        (lambda: _request("FLOAT32"), '"FLOAT32", which is not a KServe V2 datatype'),
        (lambda: _request(shape=(2, 4)), "has 0 elements but shape [2, 4] needs 8"),
    ],
    ids=[
        "raw-count",
        "typed-and-raw",
        "fp16-typed",
        "int8-range",
        "shm",
        "duplicate",
        "classif",
        "short",
        "dtype",
        "empty",
    ],
)
def test_decode_rejects_malformed_requests_naming_the_rule(
    make: Callable[[], grpc_service_pb2.ModelInferRequest], message: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_infer(make(), None)
    assert message in str(info.value)


def test_repository_names_cannot_be_paths(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    server = start_server(repository, ServeSettings(admin_enabled=True, admin_keys=("admin-key",)))
    client = client_of(server)
    for name in ("../repo/tiny", ".."):
        error = failure(lambda name=name: client.load_model(name, headers=ADMIN))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert f'model_name "{name}" is a path' in error.message()
    client.close()


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelMetadata", "ServerLive"])
def test_a_message_that_does_not_parse_is_invalid_argument_not_unknown(tiny_server: RunningServer, rpc: str) -> None:
    """Bytes that are no protobuf message are the client's mistake: INVALID_ARGUMENT naming the message type."""
    with grpc.insecure_channel(tiny_server.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid inference.{rpc}Request message" in info.value.details()


def test_a_stream_answers_a_message_that_does_not_parse_and_goes_on(tiny_server: RunningServer) -> None:
    good = triton_pb2.ModelInferRequest(model_name="tiny", id="good")
    good.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    good.raw_input_contents.append(rows_of(1).tobytes())
    with grpc.insecure_channel(tiny_server.grpc_url) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=triton_pb2.ModelStreamInferResponse.FromString,
        )
        answers = list(stream(iter([b"\xff\xff\xff\xff", good.SerializeToString()]), timeout=30))
    assert len(answers) == 2
    failed = next(answer for answer in answers if answer.error_message)
    assert "not a valid inference.ModelInferRequest message" in failed.error_message
    ok = next(answer for answer in answers if not answer.error_message)
    assert ok.infer_response.id == "good" and ok.infer_response.outputs[0].shape == [1, 3]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (Forbidden("x"), grpc.StatusCode.PERMISSION_DENIED),
        (Overloaded("x"), grpc.StatusCode.UNAVAILABLE),
        (KilnError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table(error: KilnError, code: grpc.StatusCode) -> None:
    assert status_of(error) == code
    assert len({kind for kind, _ in STATUS}) == len(STATUS)


# -- auth ---------------------------------------------------------------------------------------------------------
def test_api_key_guards_inference_but_not_health(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    server = start_server(repository, ServeSettings(api_keys=("k1",)))
    client = client_of(server)
    x = tensor(rows_of(2))
    assert client.is_server_live()
    assert client.is_server_ready()
    error = failure(lambda: client.infer("tiny", [x]))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert "Authorization: Bearer" in error.message()
    error = failure(lambda: client.infer("tiny", [x], headers={"authorization": "Bearer wrong"}))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    error = failure(lambda: client.infer("tiny", [x], headers={"authorization": "k1"}))  # no "Bearer "
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert 'not in the form "Bearer <key>"' in error.message() and "k1" not in error.message()
    error = failure(lambda: client.get_model_metadata("tiny"))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    ok = client.infer("tiny", [x], headers={"authorization": "Bearer k1"})
    assert ok.as_numpy("probabilities").shape == (2, 3)
    client.close()


def test_repository_control_is_forbidden_unless_admin_is_enabled(tiny_server: RunningServer) -> None:
    client = client_of(tiny_server)
    for call in (lambda: client.load_model("tiny", headers=ADMIN), lambda: client.unload_model("tiny", headers=ADMIN)):
        error = failure(call)
        assert error.status() == "StatusCode.PERMISSION_DENIED"
        assert "--admin" in error.message()
    assert client.is_model_ready("tiny")
    client.close()


def test_admin_key_unloads_and_loads(
    tiny_artifact: artifacts.Artifact, repository: Path, start_server: StartServer
) -> None:
    settings = ServeSettings(api_keys=("k1",), admin_enabled=True, admin_keys=("admin-key",))
    server = start_server(repository, settings)
    client = client_of(server)
    user = {"authorization": "Bearer k1"}
    error = failure(lambda: client.unload_model("tiny", headers=user))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert "admin key" in error.message()

    client.unload_model("tiny", headers=ADMIN)
    assert not client.is_model_ready("tiny")
    error = failure(lambda: client.infer("tiny", [tensor(rows_of(1))], headers=user))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "load it first" in error.message()
    index = client.get_model_repository_index(headers=user, as_json=True)
    assert index["models"] == [{"name": "tiny", "state": "UNAVAILABLE", "reason": "unloaded"}]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        only_ready = stub.RepositoryIndex(triton_pb2.RepositoryIndexRequest(ready=True), metadata=list(user.items()))
    assert list(only_ready.models) == []
    client.load_model("tiny", headers=ADMIN)
    assert client.is_model_ready("tiny")
    assert client.infer("tiny", [tensor(rows_of(1))], headers=user).as_numpy("probabilities").shape == (1, 3)

    error = failure(lambda: client.load_model("tiny", headers=ADMIN, config=json.dumps({"max_batch_size": 4})))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert 'parameter "config"' in error.message()
    error = failure(lambda: client.load_model("tiyn", headers=ADMIN))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert 'did you mean "tiny"' in error.message()
    client.close()


# -- the server's life --------------------------------------------------------------------------------------------
def test_port_clash_is_a_config_error(tiny_server: RunningServer) -> None:
    port = tiny_server.grpc.port
    with pytest.raises(ConfigError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
        tiny_server.call(start_grpc(tiny_server.plane, "127.0.0.1", port))


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones(slow_repo: Path, start_server: StartServer) -> None:
    from kiln.runtime import OrtEngine

    server = start_server(slow_repo, ServeSettings(instances=1))
    client = client_of(server)
    reference = OrtEngine(slow_repo / "slow" / "1" / "model.onnx", intra_op_threads=1)
    big, x = rows_of(256, seed=2), rows_of(2, seed=3)
    answers: list[Any] = []
    finished = threading.Semaphore(0)

    def callback(result: Any, error: Exception | None) -> None:
        answers.append(error if error is not None else result.as_numpy("probabilities"))
        finished.release()

    for _ in range(3):  # keep the one engine instance busy for a while
        client.async_infer("slow", [tensor(big)], callback)
    batcher = server.plane.repository.get("slow").batcher
    for _ in range(500):  # until the big request runs
        if batcher.running_batches:
            break
        time.sleep(0.01)
    client.async_infer("slow", [tensor(x)], callback)
    for _ in range(500):  # until the small one waits in the queue behind them (big ones are 256 rows each)
        if batcher.queued_rows % 256 == 2:
            break
        time.sleep(0.002)
    assert batcher.queued_rows % 256 == 2
    server.call(server.grpc.stop(grace_s=10.0))
    for _ in range(4):
        assert finished.acquire(timeout=30)
    answer = next(a for a in answers if getattr(a, "shape", None) == (2, 3))
    np.testing.assert_allclose(answer, reference.run({"input": x})["probabilities"], rtol=1e-4, atol=1e-6)
    error = failure(lambda: client.infer("slow", [tensor(x)], client_timeout=5))
    assert error.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    client.close()


def test_stop_answers_what_a_stream_sent_then_ends_it_without_waiting_out_the_grace(
    slow_repo: Path, start_server: StartServer
) -> None:
    """An open stream (tritonclient keeps one from start_stream to stop_stream) must not hold a shutdown for its
    whole grace period: it answers the requests it has, then ends with UNAVAILABLE."""
    server = start_server(slow_repo, ServeSettings(instances=1))
    client = client_of(server)
    answers: list[Any] = []
    arrived = threading.Semaphore(0)

    def callback(result: Any, error: InferenceServerException | None) -> None:
        answers.append(error if error is not None else result.get_response().id)
        arrived.release()

    client.start_stream(callback)
    client.async_stream_infer("slow", [tensor(rows_of(1))], request_id="idle-before")
    assert arrived.acquire(timeout=30)
    batcher = server.plane.repository.get("slow").batcher
    client.async_stream_infer("slow", [tensor(rows_of(256, seed=2))], request_id="in-flight")
    for _ in range(500):  # until it runs
        if batcher.running_batches:
            break
        time.sleep(0.01)
    server.call(server.grpc.stop(grace_s=120.0), timeout_s=60.0)  # well before the grace: nothing was left to do
    assert arrived.acquire(timeout=30)
    assert arrived.acquire(timeout=30)
    assert answers[:2] == ["idle-before", "in-flight"]
    assert isinstance(answers[2], InferenceServerException)
    assert answers[2].status() == "StatusCode.UNAVAILABLE"
    assert "shutting down" in answers[2].message()
    client.stop_stream()
    client.close()


# -- a real text model --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_text_over_grpc_equals_the_in_process_encoder(
    minilm_artifact: artifacts.Artifact, start_server: StartServer
) -> None:
    from kiln.runtime import OrtEngine, text_encoder_for

    server = start_server(minilm_artifact.path.parent.parent, ServeSettings(models=("minilm",)))
    client = client_of(server)
    texts = ["A cat sits on the mat.", "Gradient descent minimises a loss.", "¿Dónde está la biblioteca? 📚"]
    metadata = client.get_model_metadata("minilm", as_json=True)
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=np.object_))
    result = client.infer("minilm", [text])
    encoder = text_encoder_for(minilm_artifact, OrtEngine(minilm_artifact.model_path))
    expected = encoder.encode(texts)
    got = result.as_numpy(encoder.engine.outputs[0].name)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)

    typed = triton_pb2.ModelInferRequest(model_name="minilm")
    typed.inputs.add(name="text", datatype="BYTES", shape=[len(texts)]).contents.bytes_contents.extend(
        [t.encode("utf-8") for t in texts]
    )
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = triton_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=60)
    index = [o.name for o in response.outputs].index(encoder.engine.outputs[0].name)
    typed_got = np.frombuffer(response.raw_output_contents[index], dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(typed_got, expected, atol=1e-4)

    wrong = triton.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.ones(1, np.float32))
    error = failure(lambda: client.infer("minilm", [wrong]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "BYTES" in error.message()
    client.close()
