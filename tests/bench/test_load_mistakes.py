"""``kiln bench --url`` against a real ``kiln serve`` (the CLI, in a process of its own, on free ports), when the user
or the server gets something wrong: every mistake is a clear KilnError before any load, never a stack trace or a
misleading message, and a model with a BYTES tensor input that is not text still gets requests it accepts.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.bench import LoadSettings, load_test
from kiln.bench.load import payloads_for
from kiln.bench.loadclient import poisson_schedule
from kiln.bench.loadtarget import ModelMetadata, V2Target
from kiln.errors import ConfigError, InvalidInput, KilnError
from kiln.serve import free_ports
from kiln.types import Signature, TensorSpec
from tests.helpers import kiln, serving

FAST = LoadSettings(rates=(20.0,), duration_s=0.3, max_requests=4, warmup_requests=1, cooldown_s=0.0)
MAX_ROWS = 8  # a request of 9 rows is over the server's bound (400)


@dataclass(frozen=True)
class Served:
    url: str
    grpc_port: int


def write_model(repo: Path, name: str, nodes: list[Any], inputs: list[Any], outputs: list[Any], sig: Signature) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path = repo.parent / f"{name}.onnx"
    onnx.save(model, str(path))
    artifacts.write(repo, artifacts.Manifest(name=name, signature=sig, task="other"), path)


def write_repository(repo: Path) -> None:
    """ "tiny": ``input`` FP32 [N, 4] -> ``doubled``; "pairs": ``pair`` BYTES [N, 2] (a tensor of strings, no text
    model) -> ``same``."""
    from onnx import TensorProto, helper

    repo.parent.mkdir(parents=True, exist_ok=True)
    write_model(
        repo,
        "tiny",
        [helper.make_node("Add", ["input", "input"], ["doubled"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", 4])],
        Signature(inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("doubled", "FP32", (-1, 4)),)),
    )
    write_model(
        repo,
        "pairs",
        [helper.make_node("Identity", ["pair"], ["same"])],
        [helper.make_tensor_value_info("pair", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch", 2])],
        Signature(inputs=(TensorSpec("pair", "BYTES", (-1, 2)),), outputs=(TensorSpec("same", "BYTES", (-1, 2)),)),
    )


@contextlib.contextmanager
def kiln_serve(repo: Path, *extra: str) -> Iterator[Served]:
    """``kiln serve repo`` (the CLI, in a process of its own) on free ports, stopped with SIGTERM afterwards."""
    http_port, grpc_port = free_ports(2)
    command = [
        sys.executable, "-m", "kiln", "serve", str(repo), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--instances", "1", "--max-rows-per-request", str(MAX_ROWS), *extra,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    with serving(command, url):
        yield Served(url, grpc_port)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("mistakes") / "repo"
    write_repository(repo)
    with kiln_serve(repo) as server:
        yield server


# --- the server answers, but not as expected ---------------------------------------------------------------------


def test_a_url_at_the_grpc_port_says_so(served: Served) -> None:
    with pytest.raises(KilnError, match=r"did not answer HTTP.*not its gRPC port"):
        load_test(f"http://127.0.0.1:{served.grpc_port}", "tiny", settings=FAST)
    done = kiln("bench", "--url", f"http://127.0.0.1:{served.grpc_port}", "--model", "tiny", "--rates", "5")
    assert done.returncode == 2, done.stderr
    assert "did not answer HTTP" in done.stderr and "internal error" not in done.stderr


def test_too_many_rows_names_the_flag_to_lower(served: Served) -> None:
    settings = LoadSettings(rates=(20.0,), duration_s=0.3, rows_per_request=MAX_ROWS + 1, warmup_requests=0)
    with pytest.raises(InvalidInput, match=r"\(9 rows.*at most 8 rows.*lower --rows-per-request") as info:
        load_test(served.url, "tiny", settings=settings)
    assert "disagree)" in str(info.value)  # the other cause is named as a possibility only


def test_a_first_request_the_server_fails_is_not_called_a_client_mistake(tmp_path: Path) -> None:
    # a server whose every deadline is 1 µs answers 503 to every request (it was a request over the queue's bound,
    # which is now a 400 that says to split it)
    repo = tmp_path / "repo"
    write_repository(repo)
    config = tmp_path / "serve.toml"
    config.write_text("[serve]\ndefault_timeout_ms = 0.001\n", encoding="utf-8")
    settings = LoadSettings(rates=(20.0,), duration_s=0.3, warmup_requests=0)
    with (
        kiln_serve(repo, "--config", str(config)) as server,
        pytest.raises(KilnError, match=r"answered 503 to the first request.*overloaded, not ready or failing") as info,
    ):
        load_test(server.url, "tiny", settings=settings)
    assert not isinstance(info.value, InvalidInput)
    assert "metadata disagree" not in str(info.value)


# --- models whose input is BYTES ---------------------------------------------------------------------------------


def test_a_bytes_tensor_that_is_not_text_gets_requests_of_its_shape(served: Served) -> None:
    for binary in (False, True):
        report = load_test(served.url, "pairs", settings=replace(FAST, binary=binary))
        (step,) = report.steps
        assert step.requests > 0 and step.ok == step.requests and step.errors == {}
        assert report.payload["kind"] == "tensor"
        assert report.payload["outputs"] == [{"name": "same", "datatype": "BYTES", "shape": [1, 2]}]


@pytest.mark.parametrize(("shape", "sent"), [((-1,), [1]), ((-1, 1), [1, 1]), ((-1, 2), [1, 2]), ((3,), [3])])
def test_text_goes_to_one_string_per_row_inputs_only(shape: tuple[int, ...], sent: list[int]) -> None:
    metadata = ModelMetadata("m", (TensorSpec("text", "BYTES", shape),), (TensorSpec("out", "FP32", (-1, 8)),))
    payloads, described = payloads_for(metadata, LoadSettings())
    assert described["kind"] == ("text" if shape in ((-1,), (-1, 1)) else "tensor")
    (tensor,) = json.loads(payloads[0].body)["inputs"]
    assert tensor["shape"] == sent and len(tensor["data"]) == int(np.prod(sent))


# --- settings that cannot run ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rates": (10.0, math.nan)}, '"rates" has value (10.0, nan)'),
        ({"rates": (math.inf,)}, '"rates" has value (inf,)'),
        ({"duration_s": math.inf}, '"duration_s" has value inf'),
        ({"timeout_s": math.nan}, '"timeout_s" has value nan'),
        ({"cooldown_s": math.inf}, '"cooldown_s" has value inf'),
        ({"rates": (1e12,), "duration_s": 1.0}, "plans about 1,000,000,000,000 requests"),
    ],
)
def test_settings_that_cannot_run_are_refused_before_any_load(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        LoadSettings(**changes)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("localhost:8000", "not an http:// or https:// URL"),
        ("ftp://127.0.0.1:8000", "not an http:// or https:// URL"),
        ("http://", "not an http:// or https:// URL"),
        ("http://[::1", "not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:99999", "not a valid URL (Port out of range"),
    ],
)
def test_a_url_the_load_generator_cannot_speak_to_is_refused_with_an_example(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=r"e\.g\. http://127\.0\.0\.1:8000") as info:
        V2Target(url, "tiny")
    assert named in str(info.value) and repr(url) in str(info.value)
    done = kiln("bench", "--url", url, "--model", "tiny", "--rates", "5")
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "internal error" not in done.stderr and "Traceback" not in done.stderr


def test_a_rate_bounded_by_max_requests_may_be_high() -> None:
    settings = LoadSettings(rates=(1e12,), duration_s=1.0, max_requests=5)
    assert settings.max_requests == 5
    assert len(poisson_schedule(1e12, 1.0, max_requests=5)) == 5  # five draws, not 10^12
    np.testing.assert_array_equal(poisson_schedule(50.0, 10.0, 7, seed=3), poisson_schedule(50.0, 10.0, seed=3)[:7])


def test_a_report_dir_that_cannot_be_made_is_refused_before_the_load(served: Served, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the report to .*choose another --report-dir"):
        load_test(served.url, "tiny", settings=FAST, report_dir=blocker / "report")


def test_a_server_with_api_keys_is_loaded_with_api_key(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(repo)
    with kiln_serve(repo, "--api-key", "k3y") as server:
        with pytest.raises(KilnError, match=r"answered 401.*Authorization: Bearer"):
            load_test(server.url, "tiny", settings=FAST)
        report = load_test(server.url, "tiny", settings=FAST, api_key="k3y", report_dir=tmp_path / "load")
        assert [step.ok for step in report.steps] == [step.requests for step in report.steps] != [0]
        done = kiln(
            "bench", "--url", server.url, "--model", "tiny", "--rates", "20", "--duration-s", "0.3",
            "--max-requests", "4", "--api-key", "k3y",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert "k3y" not in (tmp_path / "load" / "load.json").read_text()  # the key is not written with the figures
