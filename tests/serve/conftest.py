"""A real ``kiln serve`` for the serve tests: the data plane and its transports on free ports, in this process.

The server runs on its own event loop (uvloop, as ``kiln serve`` does) in a background thread, so a test calls
it with the ordinary blocking clients (``tritonclient.grpc`` / ``tritonclient.http``) from the test thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from kiln.config import ServeSettings
from kiln.serve import DataPlane
from kiln.serve.grpc import GrpcServer, start_grpc

T = TypeVar("T")
_START_TIMEOUT_S = 120.0  # MiniLM's load and warm-up on a busy 2-core machine
_STOP_TIMEOUT_S = 60.0


@dataclass
class RunningServer:
    """A started server. ``grpc_url``/``http_url`` are ``host:port``, what tritonclient's clients take."""

    plane: DataPlane
    loop: asyncio.AbstractEventLoop
    grpc: GrpcServer
    grpc_url: str
    http_url: str | None = None
    _stops: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list, repr=False)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Run ``coroutine`` on the server's event loop (e.g. ``server.call(server.plane.repository.load("m"))``)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)


class _LoopThread:
    """An event loop running forever in a daemon thread, closed by ``close``."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kiln-test-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_STOP_TIMEOUT_S)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())  # asyncio.to_thread's workers
        self.loop.close()


async def _start(root: Path, settings: ServeSettings, http: bool, kiln_protocol: bool = True) -> RunningServer:
    plane = DataPlane(root, settings)
    stops: list[Callable[[], Coroutine[Any, Any, None]]] = []
    try:
        stops.append(plane.close)
        await plane.start()
        grpc_server = await start_grpc(plane, settings.host, 0)
        stops.append(lambda: grpc_server.stop(grace_s=5.0))
        http_url = None
        if http:
            http_url, stop_http = await _start_http(plane, settings.host, kiln_protocol)
            stops.append(stop_http)
    except BaseException:
        await _run_stops(stops)
        raise
    url = f"{settings.host}:{grpc_server.port}"
    return RunningServer(plane, asyncio.get_running_loop(), grpc_server, url, http_url, stops)


async def _start_http(
    plane: DataPlane, host: str, kiln_protocol: bool
) -> tuple[str, Callable[[], Coroutine[Any, Any, None]]]:
    import uvicorn

    from kiln.serve.http import build_app, http_protocol
    from kiln.serve.server import bind

    sock = bind(host, 0)
    protocol = http_protocol() if kiln_protocol else "httptools"  # the app under uvicorn's own protocol
    config = uvicorn.Config(
        build_app(plane), loop="none", http=protocol, lifespan="off", access_log=False, log_level="warning"
    )
    uvicorn_server = uvicorn.Server(config)
    task = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))
    while not uvicorn_server.started:
        if task.done():
            task.result()  # raises why it did not start
        await asyncio.sleep(0.01)

    async def stop() -> None:
        uvicorn_server.should_exit = True
        await task
        sock.close()

    return f"{host}:{sock.getsockname()[1]}", stop


async def _run_stops(stops: list[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    for stop in reversed(stops):  # HTTP, then gRPC (each finishes its calls in flight), then the data plane
        await stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """``start_server(root, settings=None, *, http=False, kiln_protocol=True) -> RunningServer``: serve the
    repository ``root``.

    gRPC always (on a free port; ``settings.grpc_port`` is ignored), HTTP too with ``http=True`` (with
    ``kiln_protocol=False``, on uvicorn's own HTTP protocol rather than Kiln's). Every server started in a test is
    drained and stopped when the test ends.
    """
    threads: list[tuple[_LoopThread, RunningServer]] = []

    def start(
        root: Path, settings: ServeSettings | None = None, *, http: bool = False, kiln_protocol: bool = True
    ) -> RunningServer:
        thread = _LoopThread()
        try:
            server = asyncio.run_coroutine_threadsafe(
                _start(root, settings or ServeSettings(), http, kiln_protocol), thread.loop
            ).result(_START_TIMEOUT_S)
        except BaseException:
            thread.close()
            raise
        threads.append((thread, server))
        return server

    yield start
    for thread, server in threads:
        try:
            server.call(_run_stops(server._stops), _STOP_TIMEOUT_S)
        finally:
            thread.close()


SLOW_HIDDEN = 2048


@pytest.fixture
def slow_repo(tmp_path: Path) -> Path:
    """A repository with model "slow": a real ONNX MLP (4 -> 2048 -> 2048 -> 3 softmax), about 0.05-0.1 ms per
    row on a 2-core AMD EPYC, so queues form without sleeping anywhere. ``input`` FP32 [-1, 4] ->
    ``probabilities``."""
    return _slow_repo(tmp_path, per_call_layers=0)


@pytest.fixture
def per_call_repo(tmp_path: Path) -> Path:
    """Model "slow" plus a cost each call pays whatever its rows (2-3 ms: eight 2048 x 2048 matrix-vector
    products on the first row, added to the logits times zero), as a GPU's launch cost is paid: merging requests
    saves a call's cost each, and the learned cost model sees it through the noise of a loaded machine. Without
    it, the per-call cost is 0.1-1 ms against 0.1 ms a row, and a merge of small requests pays or not by noise.
    """
    return _slow_repo(tmp_path, per_call_layers=8)


@pytest.fixture
def per_call_int8_repo(per_call_repo: Path, tmp_path: Path) -> Path:
    """``per_call_repo``'s model through ONNX Runtime's INT8 dynamic quantization (``kiln optimize``'s
    int8-dynamic recipes): each batch's activations get one scale, so a row's output depends on its batch-mates."""
    from kiln import artifact as artifacts
    from kiln.optimize.passes import quantize_dynamic

    parent = artifacts.load(per_call_repo / "slow", 1)
    quantize_dynamic(parent.model_path, tmp_path / "int8.onnx", per_channel=True)
    repo = tmp_path / "int8-repo"
    artifacts.write(repo, artifacts.Manifest(name="slow", signature=parent.manifest.signature), tmp_path / "int8.onnx")
    return repo


def _slow_repo(tmp_path: Path, per_call_layers: int) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln import artifact as artifacts
    from kiln.types import Signature, TensorSpec

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, SLOW_HIDDEN)).astype(np.float32) / 2
    w2 = rng.normal(size=(SLOW_HIDDEN, SLOW_HIDDEN)).astype(np.float32) / SLOW_HIDDEN**0.5
    w3 = rng.normal(size=(SLOW_HIDDEN, 3)).astype(np.float32) / SLOW_HIDDEN**0.5
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "w3"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    if per_call_layers:  # first row only: its cost does not grow with the batch; tanh keeps it finite, 0 * it is 0
        starts, ends = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "zero_i"), (1, "one_i")))
        initializers += [starts, ends, numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
        nodes += [
            helper.make_node("Slice", ["a1", "zero_i", "one_i", "zero_i"], ["p0"]),
            *(
                node
                for i in range(per_call_layers)
                for node in (
                    helper.make_node("MatMul", [f"p{i}", "w2"], [f"q{i}"]),
                    helper.make_node("Tanh", [f"q{i}"], [f"p{i + 1}"]),
                )
            ),
            helper.make_node("ReduceSum", [f"p{per_call_layers}"], ["per_call_sum"], keepdims=0),
            helper.make_node("Mul", ["per_call_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits", "nothing"], ["logits_kept"]),
        ]
    nodes.append(
        helper.make_node("Softmax", ["logits_kept" if per_call_layers else "logits"], ["probabilities"], axis=-1)
    )
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "slow.onnx"
    onnx.save(model, str(path))
    signature = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("probabilities", "FP32", (-1, 3)),)
    )
    repo = tmp_path / "slow-repo"
    artifacts.write(repo, artifacts.Manifest(name="slow", signature=signature, task="classification"), path)
    return repo
