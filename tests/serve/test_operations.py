"""Operating kiln serve: overload (503/429 + Retry-After), deadlines, version swaps under load, SIGHUP, SIGTERM.

The "slow" real ONNX model of conftest.py makes queues form without sleeping anywhere.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln import artifact as artifacts
from kiln.config import ServeSettings
from kiln.serve import ServerProcess, free_port, free_ports

ROWS = 64


def infer(url: str, rows: int = ROWS, *, model: str = "slow", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST one request of ``rows`` rows; (status, (headers, body))."""
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 4], "data": [0.5] * (rows * 4)}]}
    ).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, (dict(response.headers), json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return exc.code, (dict(exc.headers), json.loads(exc.read()))


def burst(url: str, count: int, rows: int = ROWS, **kwargs: Any) -> list[tuple[int, Any]]:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: infer(url, rows, **kwargs), range(count)))


@pytest.mark.parametrize("status", [503, 429])
def test_a_full_queue_answers_overload_with_retry_after_and_never_crashes(
    start_server: Callable[..., Any], slow_repo: Path, status: int
) -> None:
    settings = ServeSettings(max_queue_rows=2 * ROWS, overload_status=status, max_batch_size=ROWS)
    server = start_server(slow_repo, settings, http=True)
    results = burst(server.http_url, 24)
    codes = [code for code, _ in results]
    assert set(codes) <= {200, status}, codes
    assert codes.count(200) >= 2 and codes.count(status) >= 1, codes
    for code, (headers, body) in results:
        if code == status:
            assert headers["retry-after"] == "1"
            assert "accepts at most 128" in body["error"]
    assert infer(server.http_url)[0] == 200  # the queue drained; the server serves on
    # each refusal counts once, under its reason: failures by reason add up to the failed requests
    with urllib.request.urlopen(f"http://{server.http_url}/metrics", timeout=10) as response:
        samples = [s for f in text_string_to_metric_families(response.read().decode()) for s in f.samples]
    failures = {s.labels["reason"]: s.value for s in samples if s.name == "kiln_request_failures_total"}
    failed = [s.value for s in samples if s.name == "kiln_requests_total" and s.labels["outcome"] == "failure"]
    assert failures == {"queue_full": codes.count(status)} and failed == [codes.count(status)]


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once(
    start_server: Callable[..., Any], slow_repo: Path
) -> None:
    server = start_server(slow_repo, ServeSettings(), http=True)
    code, (headers, body) = infer(server.http_url, headers={"Timeout-Ms": "0.001"})
    assert code == 503 and "timeout" in body["error"] and headers["retry-after"] == "1"
    code, (_, body) = infer(server.http_url, headers={"Timeout-Ms": "soon"})
    assert code == 400 and "positive, finite number of milliseconds" in body["error"]
    assert infer(server.http_url, headers={"Timeout-Ms": "60000"})[0] == 200


def test_swapping_versions_under_load_fails_no_request(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact, tiny_onnx_model: Path, make_manifest: Any
) -> None:
    server = start_server(tiny_artifact.repository, ServeSettings(), http=True)
    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            code, (_, body) = infer(server.http_url, 3, model="tiny")
            outcomes.append((code, body.get("model_version", body.get("error", ""))))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model)
    assert server.call(server.plane.repository.load("tiny")) == [2]
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert outcomes and all(code == 200 for code, _ in outcomes), [o for o in outcomes if o[0] != 200][:3]
    versions = [version for _, version in outcomes]
    assert versions[0] == "1" and versions[-1] == "2"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGTERM,),
        # a second SIGINT (Ctrl-C twice) made uvicorn force-exit: the requests in flight got text 500s and the
        # process died by SIGABRT
        (signal.SIGTERM, signal.SIGINT),
        (signal.SIGINT, signal.SIGINT),
    ],
)
def test_sigterm_finishes_every_in_flight_request_and_exits_zero(
    slow_repo: Path, signals: tuple[signal.Signals, ...]
) -> None:
    with ServerProcess(slow_repo, "--max-batch-size", str(ROWS)) as server:
        url = server.url.removeprefix("http://")
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(infer, url) for _ in range(16)]
            time.sleep(0.15)  # every request is in the server (most of them queued) when the signal lands
            for signum in signals:
                server.send(signum)
                time.sleep(0.02)
            codes = [future.result()[0] for future in futures]
        assert codes == [200] * 16
        assert server.stop() == 0
    assert "drained and stopped" in server.log


@pytest.mark.e2e
def test_sigterm_with_an_upload_stalled_part_way_exits_within_the_body_timeout(slow_repo: Path) -> None:
    # the stalled request used to hold the drain for its whole 30 s, and then got a 500
    with ServerProcess(slow_repo, "--body-timeout-s", "1") as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.2)  # the request is in the server, reading its body
            started = time.monotonic()
            code = server.stop()
            stopped_in = time.monotonic() - started
            answer = sock.recv(4096)
    assert code == 0 and stopped_in < 10, (code, stopped_in, server.log[-2000:])
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


@pytest.mark.e2e
def test_sighup_swaps_in_a_new_version_and_the_cli_reports_ready_time(slow_repo: Path) -> None:
    with ServerProcess(slow_repo) as server:
        url = server.url.removeprefix("http://")
        model = artifacts.load(slow_repo / "slow")
        artifacts.write(slow_repo, model.manifest, model.model_path)
        server.send(signal.SIGHUP)
        deadline = time.monotonic() + 30
        version = ""
        while time.monotonic() < deadline and version != "2":
            code, (_, body) = infer(url, 1)
            assert code == 200
            version = body["model_version"]
        assert version == "2"
        assert server.stop() == 0
    assert "ready in" in server.log and "loaded slow version 2" in server.log


def signal_on_log_line(repository: Path, line: str, signum: int) -> tuple[int, str]:
    """Start ``kiln serve``, send ``signum`` as soon as it logs ``line``; (exit code, log)."""
    serve = [sys.executable, "-m", "kiln", "serve", str(repository)]
    ports = ["--http-port", str(free_port()), "--grpc-port", "0"]
    process = subprocess.Popen([*serve, *ports], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log: list[str] = []
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            log.append(raw.decode("utf-8", errors="replace"))
            if line in log[-1]:
                break
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)  # seconds of start-up at most: a bound, not a benchmark
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, "".join(log) + output.decode("utf-8", errors="replace")


@pytest.fixture
def many_models_repo(slow_repo: Path) -> tuple[Path, list[str]]:
    """``slow_repo`` plus a dozen copies of "slow": seconds of loads and warm-ups at start-up on 2 cores."""
    model = artifacts.load(slow_repo / "slow")
    names = [f"slow{i}" for i in range(12)]
    for name in names:
        artifacts.write(slow_repo, dataclasses.replace(model.manifest, name=name), model.model_path)
    return slow_repo, ["slow", *names]


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_it_and_exits_zero(
    many_models_repo: tuple[Path, list[str]], signum: int
) -> None:
    repository, names = many_models_repo
    # the signal lands once the first model is loaded, while the others are still to load
    code, log = signal_on_log_line(repository, "loaded slow", signum)
    assert code == 0, log
    assert f"start-up stopped by signal {int(signum)}" in log
    assert "ready in" not in log
    assert log.count("loaded slow") < len(names), log  # it stopped before loading all of them


@pytest.mark.e2e
def test_a_sigterm_just_after_start_up_is_not_lost(many_models_repo: tuple[Path, list[str]]) -> None:
    repository, _ = many_models_repo
    # between the "ready" log line and uvicorn's own signal handlers: the signal waits for them, then drains
    code, log = signal_on_log_line(repository, "ready in", signal.SIGTERM)
    assert code == 0, log
    assert "drained and stopped" in log


def test_free_ports_are_distinct_and_free() -> None:
    """Ports picked together never repeat (one free_port() after another may), and each can be listened on."""
    ports = free_ports(16)
    assert len(set(ports)) == 16
    listeners = []
    try:
        for port in ports:
            sock = socket.socket()
            listeners.append(sock)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        for sock in listeners:
            sock.close()


def test_a_host_or_repository_that_cannot_be_served_is_named_with_its_own_fix(tmp_path: Path) -> None:
    # --host 999.1.1.1 was told to choose another port; a file given as the repository "does not exist"
    from kiln.errors import ConfigError
    from kiln.serve.server import bind
    from tests.helpers import kiln

    for host in ("999.1.1.1", "192.0.2.1"):  # a name that does not resolve; an address of no interface here
        with pytest.raises(ConfigError, match=rf"cannot listen on {host}:\d+ .*; pass --host an address of this"):
            bind(host, free_port())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken, pytest.raises(ConfigError, match=r"; choose another port with --http-port/--grpc-port"):
        bind("127.0.0.1", taken.getsockname()[1])
    (tmp_path / "afile").write_text("not a repository")
    done = kiln("serve", tmp_path / "afile")
    assert done.returncode == 2 and "is a file, not a directory" in done.stderr, done.stderr


def test_serve_applies_keyword_overrides_over_the_settings_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # serve(root, settings, http_port=...) dropped the override whenever settings were passed
    from kiln.serve import server

    started: list[ServeSettings] = []

    async def record(root: Path, settings: ServeSettings) -> None:
        started.append(settings)

    monkeypatch.setattr(server, "serve_async", record)
    server.serve(tmp_path, ServeSettings(http_port=1234, max_batch_size=8), http_port=4321)
    server.serve(tmp_path, http_port=4321)
    assert [(s.http_port, s.max_batch_size) for s in started] == [(4321, 8), (4321, ServeSettings().max_batch_size)]
