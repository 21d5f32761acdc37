"""The load generator against a real V2 server: the FastAPI baseline of bench/, started on a free port.

No test asserts a timing: counts, error kinds and the latency definition are exact; rates only within their
Poisson bounds.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.bench import LoadClient, LoadReport, LoadSettings, load_test, search_max_rate, write_load_html
from kiln.bench.load import payloads_for
from kiln.bench.loadclient import poisson_schedule
from kiln.bench.loadreport import read_load_json
from kiln.bench.loadresults import STEP_COLUMNS, LoadStep, step_cells
from kiln.bench.loadtarget import BINARY_HEADER, Payload, V2Target, encode_request
from kiln.errors import ConfigError, ModelNotFound
from kiln.serve import free_port
from kiln.types import Signature, TensorSpec
from tests.helpers import kiln, serving

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE = REPO_ROOT / "bench" / "serve_fastapi_baseline.py"
FAST = LoadSettings(rates=(40.0,), duration_s=0.5, warmup_requests=2, cooldown_s=0.0)


@contextmanager
def baseline_server(artifact_dir: Path) -> Iterator[str]:
    """The FastAPI + ORT baseline serving ``artifact_dir``; yields its URL once GET /v2/health/ready is 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving([sys.executable, str(BASELINE), str(artifact_dir), "--port", str(port)], url):
        yield url


def write_tiny_artifact(repo: Path) -> artifacts.Artifact:
    """The tiny classifier of tests/conftest.py: ``input`` FP32 [N, 4] -> ``probabilities`` FP32 [N, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weight"], ["logits_no_bias"]),
            helper.make_node("Add", ["logits_no_bias", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "weight"),
            numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repo.parent / "tiny.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    signature = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("probabilities", "FP32", (-1, 3)),)
    )
    return artifacts.write(repo, artifacts.Manifest(name="tiny", signature=signature, task="classification"), path)


@pytest.fixture(scope="module")
def tiny_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    art = write_tiny_artifact(tmp_path_factory.mktemp("load") / "repo")
    with baseline_server(art.path) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_client(tiny_url: str) -> Iterator[LoadClient]:
    """One worker process for the open- and closed-loop tests against the tiny model."""
    target = V2Target(tiny_url, "tiny")
    payloads, _ = payloads_for(target.metadata(), FAST)
    with LoadClient(target, payloads, warmup_requests=2) as client:
        yield client


# --- open loop ---------------------------------------------------------------------------------------------------


def test_open_loop_sends_every_scheduled_request_and_reports_its_rate(tiny_client: LoadClient) -> None:
    expected = len(poisson_schedule(60.0, 1.0, None, seed=0))
    assert 60 - 4 * 60**0.5 < expected < 60 + 4 * 60**0.5  # a Poisson count around rate x duration

    step = tiny_client.open_loop(60.0, duration_s=1.0, seed=0)

    assert (step.mode, step.target_rps, step.requests, step.ok, step.errors) == ("open", 60.0, expected, expected, {})
    assert step.offered_rps == pytest.approx(expected / 1.0)
    assert 0 < step.achieved_rps <= step.offered_rps  # answers counted over a window at least as long as the plan
    assert step.p50_ms is not None and step.p99_ms is not None and step.max_ms is not None
    assert 0 < step.p50_ms <= step.p99_ms <= step.max_ms
    assert step.meets(p99_ms=step.p99_ms, max_error_rate=0.01)


def test_a_step_ends_at_its_request_bound_before_its_duration(tiny_client: LoadClient) -> None:
    step = tiny_client.open_loop(200.0, duration_s=30.0, max_requests=25)
    assert (step.requests, step.ok) == (25, 25)
    last_arrival = float(poisson_schedule(200.0, 30.0, 25, seed=0)[-1])
    assert last_arrival < 1.0  # 25 arrivals at 200/s: the plan ends long before 30 s ...
    assert step.samples is not None and step.samples.span_s == last_arrival  # ... and so does the step
    assert step.offered_rps == pytest.approx(25 / last_arrival)


def test_a_burst_offered_at_an_absurd_rate_does_not_hold_that_rate(tiny_client: LoadClient) -> None:
    # 50 requests "at 10^9/s" were answered within the P99 bar, and the summary named 10^9 requests/s as held
    import dataclasses

    step = tiny_client.open_loop(1e9, duration_s=10.0, max_requests=50)
    assert step.ok == 50 and step.p99_ms is not None and step.p99_ms < 200
    assert step.achieved_rps < 1e-3 * step.offered_rps
    assert not step.meets(p99_ms=200, max_error_rate=0.01)
    kept_up = dataclasses.replace(step, achieved_rps=0.8 * step.offered_rps)
    assert kept_up.meets(p99_ms=200, max_error_rate=0.01)
    assert not dataclasses.replace(kept_up, achieved_rps=0.79 * step.offered_rps).meets(200, 0.01)


def test_latency_is_measured_from_the_scheduled_send_time(tiny_client: LoadClient) -> None:
    step = tiny_client.run_schedule([0.0] * 32, max_outstanding=32)
    samples = step.samples
    assert samples is not None and step.ok == 32
    service_s = samples.done_s - samples.sent_s
    # Every request was due at 0 s; the client sent them one after another, so each waited before it went out.
    assert np.all(samples.sent_s > samples.scheduled_s)
    np.testing.assert_array_equal(samples.latency_s, samples.done_s)  # done - 0
    assert np.all(samples.latency_s > service_s)
    assert step.max_ms == pytest.approx(float(samples.done_s.max()) * 1e3)
    assert step.send_lag_p99_ms > 0


def test_requests_over_the_outstanding_cap_are_client_overload_errors(tiny_client: LoadClient) -> None:
    step = tiny_client.run_schedule([0.0] * 20, max_outstanding=3)
    assert (step.requests, step.ok, step.errors) == (20, 3, {"client-overload": 17})
    assert step.error_rate == pytest.approx(0.85)
    assert not step.meets(p99_ms=1e9, max_error_rate=0.01)


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "version"), [("no-such-model", None), ("tiny", "7")])
def test_404s_from_a_wrong_model_or_version_are_counted_not_fatal(
    tiny_url: str, tiny_client: LoadClient, model: str, version: str | None
) -> None:
    payloads, _ = payloads_for(V2Target(tiny_url, "tiny").metadata(), FAST)
    with LoadClient(V2Target(tiny_url, model, version), payloads, warmup_requests=0) as client:
        step = client.open_loop(40.0, duration_s=0.5, max_requests=12, seed=1)
    assert step.requests > 0
    assert (step.ok, step.errors) == (0, {"404": step.requests})
    assert step.p99_ms is None and step.error_rate == 1.0
    assert not step.meets(p99_ms=200.0, max_error_rate=0.01)


def test_refused_connections_are_counted_by_kind(tiny_client: LoadClient) -> None:
    payloads, _ = payloads_for(tiny_client.target.metadata(), FAST)
    with LoadClient(V2Target(f"http://127.0.0.1:{free_port()}", "tiny"), payloads, warmup_requests=1) as client:
        step = client.run_schedule([0.0, 0.01, 0.02, 0.03])
    assert (step.requests, step.ok, step.errors) == (4, 0, {"connection": 4})


class ScriptedServer:
    """A real HTTP/1.1 socket server whose answers a test scripts: ``answer(request_number) -> bytes | None``
    (None: read the request, answer nothing). It counts the connections it accepted."""

    def __init__(self, answer: Callable[[int], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as reader:
            while reader.readline():  # a request line
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    length = int(value) if name.lower() == "content-length" else length
                reader.read(length)
                with self._lock:
                    number, self.requests = self.requests, self.requests + 1
                answer = self.answer(number)
                if answer is None:
                    continue
                connection.sendall(answer)
                if b"connection: close" in answer.lower():
                    return

    def close(self) -> None:
        self._socket.close()


def _answer(status: int = 200, headers: str = "") -> bytes:
    body = b'{"outputs": []}'
    return f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{headers}\r\n".encode() + body


@contextmanager
def scripted_client(
    answer: Callable[[int], bytes | None], timeout_s: float = 10.0
) -> Iterator[tuple[ScriptedServer, LoadClient]]:
    server = ScriptedServer(answer)
    payloads = [Payload(b'{"inputs": []}', (("Content-Type", "application/json"),), 1)]
    try:
        with LoadClient(V2Target(server.url, "m"), payloads, timeout_s=timeout_s, warmup_requests=0) as client:
            yield server, client
    finally:
        server.close()


def test_keep_alive_connections_are_reused_across_requests_and_steps() -> None:
    with scripted_client(lambda _: _answer()) as (server, client):
        first = client.closed_loop(2, duration_s=30.0, max_requests=40)
        second = client.closed_loop(2, duration_s=30.0, max_requests=40)
    assert (first.ok, second.ok, server.requests) == (40, 40, 80)
    assert server.connections == 2  # one per client, kept from the first step to the second


def test_an_answer_that_closes_its_connection_is_counted_and_the_next_request_reconnects() -> None:
    with scripted_client(lambda _: _answer(headers="Connection: close\r\n")) as (server, client):
        step = client.closed_loop(1, duration_s=30.0, max_requests=5)
    assert (step.ok, step.errors, server.connections) == (5, {}, 5)


def test_a_chunked_answer_is_read_to_its_end_and_its_connection_reused() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    with scripted_client(lambda _: chunked) as (server, client):
        step = client.closed_loop(1, duration_s=30.0, max_requests=6)
    assert (step.ok, step.errors, server.connections) == (6, {}, 1)


def test_a_server_that_never_answers_gives_timeouts_not_a_hang() -> None:
    with scripted_client(lambda _: None, timeout_s=0.3) as (_, client):
        step = client.run_schedule([0.0, 0.0, 0.05])
    assert (step.requests, step.ok, step.errors) == (3, 0, {"timeout": 3})
    assert step.samples is not None and np.all(step.samples.done_s - step.samples.sent_s >= 0.3 - 0.01)


def test_a_malformed_answer_is_a_client_error_and_its_status_codes_are_kept() -> None:
    answers = {0: b"HTTP/1.1 abc nonsense\r\n\r\n", 1: _answer(503), 2: _answer()}
    with scripted_client(lambda n: answers[n]) as (server, client):
        step = client.closed_loop(1, duration_s=30.0, max_requests=3)
    assert (step.ok, step.errors) == (1, {"client-error": 1, "503": 1})
    assert server.connections == 2  # the malformed answer's connection was dropped, the 503's kept


def test_load_test_names_a_missing_model(tiny_url: str) -> None:
    with pytest.raises(ModelNotFound, match=r'no model "tinny".*serves tiny'):
        load_test(tiny_url, "tinny", settings=FAST)


def test_settings_outside_their_rules_are_refused() -> None:
    with pytest.raises(ConfigError, match="rates is \\[\\]; it must be positive numbers"):
        LoadSettings(rates=())
    with pytest.raises(ConfigError, match="concurrency is 0"):
        LoadSettings(concurrency=0)


# --- JSON, binary, text, closed loop -----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_json_and_binary_requests_both_succeed(tiny_url: str, binary: bool) -> None:
    settings = LoadSettings(rates=(30.0,), duration_s=0.5, binary=binary, warmup_requests=1, cooldown_s=0.0)
    report = load_test(tiny_url, "tiny", settings=settings)
    (step,) = report.steps
    assert step.requests > 0 and step.ok == step.requests and step.errors == {}
    assert report.payload["binary"] is binary
    assert report.payload["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [1, 3]}]


def test_binary_and_json_bodies_carry_the_same_tensors() -> None:
    floats = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    texts = np.array(["a sentence", "ünïcode, with a comma"], dtype=object)
    tensors = [("input", "FP32", floats), ("text", "BYTES", texts)]
    as_json = json.loads(encode_request(tensors, [], binary=False).body)
    binary = encode_request(tensors, ["probabilities"], binary=True)
    headers = dict(binary.headers)
    split = int(headers[BINARY_HEADER])
    header, raw = json.loads(binary.body[:split]), binary.body[split:]
    assert header["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": True}}]
    float_size = header["inputs"][0]["parameters"]["binary_data_size"]
    np.testing.assert_array_equal(np.frombuffer(raw[:float_size], "<f4"), as_json["inputs"][0]["data"])
    strings, rest = [], raw[float_size:]
    while rest:
        (length,) = struct.unpack_from("<I", rest)
        strings.append(rest[4 : 4 + length].decode())
        rest = rest[4 + length :]
    assert strings == as_json["inputs"][1]["data"] == list(texts)
    assert [i["shape"] for i in header["inputs"]] == [[2, 4], [2]]


def test_text_models_get_real_sentences_in_json_and_binary(text_artifacts: list[artifacts.Artifact]) -> None:
    with baseline_server(text_artifacts[0].path) as url:
        for binary in (False, True):
            settings = LoadSettings(
                rates=(20.0,), duration_s=0.5, texts_per_request=2, binary=binary, warmup_requests=1, cooldown_s=0
            )
            report = load_test(url, "bow", settings=settings)
            (step,) = report.steps
            assert step.ok == step.requests > 0, step.errors
            assert report.payload["kind"] == "text" and report.payload["texts_per_request"] == 2
            assert report.payload["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32", "shape": [2, 8]}]


def test_the_table_shows_how_late_the_client_sent_in_open_loop_only() -> None:
    open_step = replace(synthetic_step(40.0, 60.0), send_lag_p99_ms=12.5)
    closed_step = replace(synthetic_step(40.0, 60.0), mode="closed", target_rps=None, clients=4)
    lag = STEP_COLUMNS.index("send lag p99 ms")
    assert step_cells(open_step)[lag] == "12.5"
    assert step_cells(closed_step)[lag] == "-"
    assert len(step_cells(open_step)) == len(STEP_COLUMNS)


def test_closed_loop_runs_each_client_count(tiny_url: str, tiny_client: LoadClient, tmp_path: Path) -> None:
    settings = LoadSettings(closed_loop=(1, 3), duration_s=0.4, warmup_requests=1, cooldown_s=0.0)
    report = load_test(tiny_url, "tiny", settings=settings)
    assert [(s.mode, s.clients, s.target_rps) for s in report.steps] == [("closed", 1, None), ("closed", 3, None)]
    for step in report.steps:
        assert step.ok == step.requests > 0 and step.errors == {}
        assert step.rate_rps == step.achieved_rps
    bounded = tiny_client.closed_loop(2, duration_s=30.0, max_requests=15)
    assert (bounded.requests, bounded.ok) == (15, 15)
    # the report said the rates of the open loop it did not run, "1 clients", and "open loop: Poisson arrivals"
    assert "rates" not in report.settings and "concurrency" not in report.settings
    assert step_cells(report.steps[0])[0] == "1 client" and step_cells(report.steps[1])[0] == "3 clients"
    page = write_load_html([report], tmp_path / "html", title="closed").read_text(encoding="utf-8")
    assert "In closed loop" in page and "Poisson" not in page


# --- figures from results ----------------------------------------------------------------------------------------


def synthetic_step(rate: float, p99_ms: float | None, errors: dict[str, int] | None = None, ok: int = 100) -> LoadStep:
    errors = errors or {}
    return LoadStep(
        mode="open",
        target_rps=rate,
        clients=None,
        requests=ok + sum(errors.values()),
        ok=ok,
        offered_rps=rate,
        achieved_rps=rate * 0.98,
        p50_ms=None if p99_ms is None else p99_ms / 3,
        p90_ms=None if p99_ms is None else p99_ms / 2,
        p99_ms=p99_ms,
        max_ms=None if p99_ms is None else p99_ms * 1.5,
        errors=errors,
        send_lag_p99_ms=0.1,
        duration_s=8.0,
    )


def synthetic_report(label: str = "kiln <batching & on>") -> LoadReport:
    return LoadReport(
        url="http://127.0.0.1:8000",
        model="minilm",
        label=label,
        steps=[
            synthetic_step(20.0, 30.0),
            synthetic_step(80.0, 200.0),  # exactly at the bar: holds it
            synthetic_step(40.0, 60.0),
            synthetic_step(100.0, 150.0, {"503": 1}, ok=99),  # exactly 1% errors: does not hold "< 1%"
            synthetic_step(120.0, 199.0, {"client-overload": 3}, ok=97),
            synthetic_step(160.0, None, {"timeout": 10}, ok=0),
            synthetic_step(90.0, 201.0),
        ],
        created_at="2025-01-01T00:00:00+00:00",
    )


def test_max_rate_within_picks_the_highest_rate_that_held_the_bar() -> None:
    report = synthetic_report()
    assert report.max_rate_within(p99_ms=200, max_error_rate=0.01) == 80.0
    # 100 and 120 req/s pass with 2% or 5% errors allowed, but 90 req/s failed (P99 201 ms): a pass above a failed
    # rate is luck, not capacity (the walk-through saw 120 reported over a failed 80)
    assert report.max_rate_within(p99_ms=200, max_error_rate=0.02) == 80.0
    assert report.max_rate_within(p99_ms=202, max_error_rate=0.02) == 100.0
    assert report.max_rate_within(p99_ms=202, max_error_rate=0.05) == 120.0
    assert report.max_rate_within(p99_ms=50, max_error_rate=0.01) == 20.0
    assert report.max_rate_within(p99_ms=10, max_error_rate=0.01) is None
    best = report.best_step_within(p99_ms=200, max_error_rate=0.01)
    assert best is not None and best.p99_ms == 200.0
    assert [point[0] for point in report.curve()] == pytest.approx([r * 0.98 for r in (20, 40, 80, 90, 100, 120, 160)])


class CapacityServer:
    """A stand-in for LoadClient.open_loop: holds P99 under 200 ms up to ``capacity`` requests/s, then not."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.rates: list[float] = []

    def open_loop(
        self, rate_rps: float, *, duration_s: float, max_requests: int | None, max_outstanding: int, seed: int
    ) -> LoadStep:
        self.rates.append(rate_rps)
        return synthetic_step(rate_rps, 50.0 if rate_rps <= self.capacity else 900.0)


@pytest.mark.parametrize(("capacity", "start"), [(75.0, 20.0), (7.0, 40.0)])
def test_search_max_rate_brackets_then_bisects(capacity: float, start: float) -> None:
    server = CapacityServer(capacity)
    found = search_max_rate(server, start_rps=start, growth=2.0, refine_steps=4, cooldown_s=0.0)
    assert found.rate_rps is not None and found.best is not None
    assert capacity / 2 ** (1 / 16) <= found.rate_rps <= capacity  # 4 bisections of a factor-2 bracket
    assert len(found.steps) == len(server.rates)
    assert search_max_rate(CapacityServer(0.1), start_rps=1.0, cooldown_s=0.0).rate_rps is None


@pytest.mark.parametrize(("capacity", "expected_rates"), [(math.inf, [90.0, 100.0]), (95.0, [90.0, 100.0])])
def test_search_max_rate_never_tries_or_reports_a_rate_past_max_rps(
    capacity: float, expected_rates: list[float]
) -> None:
    server = CapacityServer(capacity)
    found = search_max_rate(server, start_rps=90.0, max_rps=100.0, growth=1.5, refine_steps=3, cooldown_s=0.0)
    assert server.rates[:2] == expected_rates  # the step past 90 is max_rps itself, not 135
    assert max(server.rates) <= 100.0
    assert found.rate_rps is not None and found.rate_rps <= min(capacity, 100.0)
    if capacity == math.inf:
        assert found.rate_rps == 100.0 and len(server.rates) == 2  # max_rps held: nothing left to bisect
    with pytest.raises(ConfigError, match="start_rps 120 is above max_rps 100"):
        search_max_rate(CapacityServer(capacity), start_rps=120.0, max_rps=100.0, cooldown_s=0.0)


class LuckyServer(CapacityServer):
    """Holds ``capacity``, and passes the first step at each higher rate by luck."""

    def open_loop(
        self, rate_rps: float, *, duration_s: float, max_requests: int | None, max_outstanding: int, seed: int
    ) -> LoadStep:
        lucky = rate_rps > self.capacity and rate_rps not in self.rates
        self.rates.append(rate_rps)
        return synthetic_step(rate_rps, 50.0 if rate_rps <= self.capacity or lucky else 900.0)


def test_confirming_steps_reject_a_rate_that_passed_by_luck() -> None:
    unconfirmed = search_max_rate(LuckyServer(75.0), start_rps=20.0, growth=2.0, refine_steps=2, cooldown_s=0.0)
    assert unconfirmed.rate_rps is not None and unconfirmed.rate_rps > 75.0  # the lucky steps fool one-step search
    server = LuckyServer(75.0)
    found = search_max_rate(server, start_rps=20.0, growth=2.0, refine_steps=2, cooldown_s=0.0, confirm=2)
    assert found.rate_rps is not None and found.rate_rps <= 75.0
    assert found.best is not None and found.best.rate_rps == found.rate_rps
    assert len(found.steps) == len(server.rates)


def test_confirmed_bisection_narrows_the_gap_a_failed_confirmation_leaves() -> None:
    """80 req/s passes once by luck and fails its re-runs; the fallback is 40, a step of the growth phase, though
    the server holds 75. Bisecting between 40 and 80, each midpoint held to a majority of 3 steps, finds it."""
    coarse = search_max_rate(LuckyServer(75.0), start_rps=20.0, growth=2.0, refine_steps=2, cooldown_s=0.0, confirm=2)
    assert coarse.rate_rps == 40.0
    server = LuckyServer(75.0)
    found = search_max_rate(
        server, start_rps=20.0, growth=2.0, refine_steps=2, cooldown_s=0.0, confirm=2, confirm_refine_steps=4
    )
    assert found.rate_rps is not None and 70.0 <= found.rate_rps <= 75.0  # 40 * 2 ** (1 - 1/16) ~ 76.6 failed
    assert found.best is not None and found.best.rate_rps == found.rate_rps
    assert sum(rate == found.rate_rps for rate in server.rates) == 2  # two wins decide a majority of 3: no third


def test_load_html_has_both_plots_and_round_trips_its_json(tmp_path: Path) -> None:
    reports = [synthetic_report(), synthetic_report("fastapi baseline")]
    path = write_load_html(reports, tmp_path / "out", title="MiniLM under load")
    page = path.read_text(encoding="utf-8")
    assert page.count("<svg") == 2
    assert "Latency vs throughput" in page and "Achieved vs offered rate" in page
    assert "<script" not in page and "&lt;batching &amp; on&gt;" in page and "<batching & on>" not in page
    assert "80.0 requests/s" in page  # the highest rate within the bar, per server
    assert read_load_json(tmp_path / "out" / "load.json") == reports


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_bench_url_prints_the_table_and_writes_the_report(tiny_url: str, tmp_path: Path) -> None:
    done = kiln(
        "bench", "--url", tiny_url, "--model", "tiny", "--rates", "20,40", "--duration-s", "0.4",
        "--max-requests", "10", "--binary", "--report-dir", tmp_path / "load",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "load: tiny @" in done.stdout and "highest rate with P99 <= 200 ms" in done.stdout
    (report,) = read_load_json(tmp_path / "load" / "load.json")
    assert [s.target_rps for s in report.steps] == [20.0, 40.0]
    assert all(s.requests <= 10 and s.ok == s.requests for s in report.steps)
    assert report.settings["binary"] is True


def test_cli_bench_url_writes_its_report_where_kiln_report_dir_says(tiny_url: str, tmp_path: Path) -> None:
    # the variable was honoured in-process only: --url wrote to kiln-report/load in the working directory
    args = ("--url", tiny_url, "--model", "tiny", "--rates", "20", "--duration-s", "0.2", "--max-requests", "4")
    done = kiln("bench", *args, cwd=tmp_path, env={"KILN_REPORT_DIR": str(tmp_path / "mine")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mine" / "load.json").is_file() and not (tmp_path / "kiln-report").exists()


def test_cli_bench_needs_models_or_a_url() -> None:
    done = kiln("bench")
    assert done.returncode == 2
    assert "needs model directories" in done.stderr and "--url URL --model NAME" in done.stderr
    done = kiln("bench", "--url", "http://127.0.0.1:1")
    assert done.returncode == 2 and "needs --model NAME" in done.stderr
