"""kiln.serve.repository: a version that fails to load is a clear error, recorded, and the old one keeps serving.

The server is the real one (see conftest.py); the admin API loads over HTTP and gRPC, and ``reload`` is what
SIGHUP runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from kiln import artifact as artifacts
from kiln.config import ServeSettings

ADMIN_KEY = "root-key"
ADMIN_SETTINGS = ServeSettings(admin_enabled=True, admin_keys=(ADMIN_KEY,))


def post(url: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """A raw POST as the admin; (status, parsed JSON body) whatever the status."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    request = urllib.request.Request(f"http://{url}{path}", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def served_version(url: str, model: str = "tiny") -> str:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    code, payload = post(url, f"/v2/models/{model}/infer", body.encode())
    assert code == 200, payload
    return str(payload["model_version"])


def index_entry(url: str, model: str = "tiny") -> dict[str, Any]:
    code, entries = post(url, "/v2/repository/index")
    assert code == 200
    failed = [e for e in entries if e["name"] == model and e["state"] == "UNAVAILABLE"]
    assert len(failed) == 1, entries
    return dict(failed[0])


def corrupt_model_file(version: Path) -> Path:
    """Garbage in model.onnx, with the manifest's sha256 updated to match: the integrity check passes."""
    model = version / "model.onnx"
    model.write_bytes(b"this is not an ONNX model")
    manifest_path = version / "kiln.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["model"]["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    return model


def remove_manifest(version: Path) -> Path:
    (version / "kiln.json").unlink()
    return version / "kiln.json"


def manifest_not_an_object(version: Path) -> Path:
    (version / "kiln.json").write_text("[]", encoding="utf-8")
    return version / "kiln.json"


@pytest.mark.parametrize(
    ("damage", "rule"),
    [
        (corrupt_model_file, "is not a model ONNX Runtime can load"),
        (remove_manifest, "is missing"),
        (manifest_not_an_object, "holds a list, not a JSON object"),
    ],
)
def test_a_broken_new_version_is_a_409_naming_the_file_and_the_old_version_keeps_serving(
    start_server: Callable[..., Any],
    tiny_artifact: artifacts.Artifact,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
    damage: Callable[[Path], Path],
    rule: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(tiny_artifact.repository, ADMIN_SETTINGS, http=True)
    broken = damage(artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model).path)

    with caplog.at_level(logging.ERROR, logger="kiln.serve.repository"):
        code, payload = post(server.http_url, "/v2/repository/models/tiny/load")

    assert code == 409, payload
    assert f"loading tiny version 2 failed: {payload['error']}" in caplog.text  # the log had no line of it
    assert f'"{broken}" {rule}' in payload["error"] and "export the model again" in payload["error"]
    assert served_version(server.http_url) == "1"
    entry = index_entry(server.http_url)
    assert entry["version"] == "2" and entry["reason"] == payload["error"]


def test_a_version_copied_by_hand_whose_manifest_names_another_version_is_a_409(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact
) -> None:
    # `cp -r tiny/1 tiny/2`: the load answered 404 ("pass the model directory instead", a CLI hint) for a model the
    # index lists, where every other broken version is a 409
    import shutil

    server = start_server(tiny_artifact.repository, ADMIN_SETTINGS, http=True)
    copy = shutil.copytree(tiny_artifact.path, tiny_artifact.path.parent / "2")

    code, payload = post(server.http_url, "/v2/repository/models/tiny/load")

    assert code == 409, payload
    assert payload["error"] == (
        f'"{copy}" holds a kiln.json of version 1, not of version 2, its directory (copied from another version?); '
        'set "version": 2 in it, or remove the directory'
    )
    assert served_version(server.http_url) == "1"
    assert index_entry(server.http_url)["reason"] == payload["error"]


def test_the_index_shows_why_the_latest_attempt_failed_not_an_older_reason(
    start_server: Callable[..., Any],
    tiny_artifact: artifacts.Artifact,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
) -> None:
    server = start_server(tiny_artifact.repository, ADMIN_SETTINGS, http=True)
    version = artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model).path
    (version / "model.onnx").write_bytes(b"this is not an ONNX model")
    assert post(server.http_url, "/v2/repository/models/tiny/load")[0] == 409
    assert "sha256" in index_entry(server.http_url)["reason"]

    corrupt_model_file(version)  # the operator "fixes" the hash; the file is still not a model
    code, payload = post(server.http_url, "/v2/repository/models/tiny/load")

    assert code == 409, payload
    reason = index_entry(server.http_url)["reason"]
    assert "is not a model ONNX Runtime can load" in reason and "sha256" not in reason


def test_a_model_name_longer_than_the_file_system_allows_is_not_found_over_http_and_grpc(
    start_server: Callable[..., Any], tiny_artifact: artifacts.Artifact
) -> None:
    server = start_server(tiny_artifact.repository, ADMIN_SETTINGS, http=True)
    name = "m" * 300

    code, payload = post(server.http_url, f"/v2/repository/models/{name}/load")

    assert code == 404, payload
    assert "300 characters, longer than the file system allows" in payload["error"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    client.close()
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "longer than the file system allows" in str(info.value.message())
    assert served_version(server.http_url) == "1"


def test_a_reload_goes_on_past_a_model_that_fails(
    start_server: Callable[..., Any],
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
) -> None:
    for name in ("a", "b"):
        artifacts.write(repository, make_manifest(name=name), tiny_onnx_model)
    server = start_server(repository, ADMIN_SETTINGS, http=True)
    corrupt_model_file(artifacts.write(repository, make_manifest(name="a"), tiny_onnx_model).path)
    artifacts.write(repository, make_manifest(name="b"), tiny_onnx_model)

    server.call(server.plane.repository.reload())  # what SIGHUP runs

    assert served_version(server.http_url, "a") == "1"
    assert served_version(server.http_url, "b") == "2"
    entry = index_entry(server.http_url, "a")
    assert entry["version"] == "2" and "is not a model ONNX Runtime can load" in entry["reason"]


def test_a_reload_unloads_a_model_whose_directory_is_gone_and_keeps_one_mid_copy(
    start_server: Callable[..., Any],
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
) -> None:
    import shutil

    for name in ("gone", "copying", "kept"):
        artifacts.write(repository, make_manifest(name=name), tiny_onnx_model)
    server = start_server(repository, ADMIN_SETTINGS, http=True)
    shutil.rmtree(repository / "gone")  # removed from the repository, as Triton's poll mode would see it
    shutil.rmtree(repository / "copying" / "1")  # its directory is there, its versions not yet

    server.call(server.plane.repository.reload())  # what SIGHUP runs

    assert sorted(server.plane.repository.served()) == ["copying", "kept"]
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    code, payload = post(server.http_url, "/v2/models/gone/infer", body.encode())
    assert code == 404 and 'model "gone" is not served here' in payload["error"]
    assert served_version(server.http_url, "copying") == "1"


def test_a_reload_loads_a_model_directory_that_is_new_or_back_but_not_one_unloaded_over_the_api(
    start_server: Callable[..., Any],
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a model moved away for one SIGHUP stayed unloaded for good, and a new model directory was never loaded
    for name in ("moved", "unloaded"):
        artifacts.write(repository, make_manifest(name=name), tiny_onnx_model)
    server = start_server(repository, ADMIN_SETTINGS, http=True)
    repo = server.plane.repository
    (repository / "moved").rename(repository.parent / "moved-away")
    server.call(repo.reload())
    assert sorted(repo.served()) == ["unloaded"]
    (repository.parent / "moved-away").rename(repository / "moved")
    artifacts.write(repository, make_manifest(name="new"), tiny_onnx_model)
    with caplog.at_level(logging.INFO, logger="kiln.serve.repository"):
        assert post(server.http_url, "/v2/repository/models/unloaded/unload")[0] == 200
        server.call(repo.reload())
    assert sorted(repo.served()) == ["moved", "new"]
    assert "unloaded unloaded versions [1]" in caplog.text  # an unload over the API was not logged
    # {"ready": true} was ignored over HTTP (gRPC filtered): the unloaded model came back with the others
    code, ready = post(server.http_url, "/v2/repository/index", b'{"ready": true}')
    assert code == 200 and sorted(e["name"] for e in ready) == ["moved", "new"], ready
    code, everything = post(server.http_url, "/v2/repository/index")
    assert code == 200 and "unloaded" in [e["name"] for e in everything]
    code, payload = post(server.http_url, "/v2/repository/index", b'{"ready": "yes"}')
    assert code == 400 and payload["error"] == '"ready" is "yes"; it must be true or false (or left out)'
    artifacts.write(repository, make_manifest(name="other"), tiny_onnx_model)
    server.call(repo.reload(("moved",)))  # --models moved: a SIGHUP loads no other model
    assert sorted(repo.served()) == ["moved", "new"]
    assert post(server.http_url, "/v2/repository/models/unloaded/load")[0] == 200  # the API undoes its unload
    assert served_version(server.http_url, "unloaded") == "1"


def test_a_reload_goes_on_past_an_unexpected_error_and_records_it(
    start_server: Callable[..., Any],
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("a", "b"):
        artifacts.write(repository, make_manifest(name=name), tiny_onnx_model)
    server = start_server(repository, ADMIN_SETTINGS, http=True)
    for name in ("a", "b"):
        artifacts.write(repository, make_manifest(name=name), tiny_onnx_model)
    repo = server.plane.repository
    build = repo._build

    def build_failing_a(name: str, version: int) -> Any:
        if name == "a":
            raise MemoryError("out of memory while building the engine")
        return build(name, version)

    monkeypatch.setattr(repo, "_build", build_failing_a)

    server.call(repo.reload())

    assert served_version(server.http_url, "a") == "1"
    assert served_version(server.http_url, "b") == "2"
    entry = index_entry(server.http_url, "a")
    assert entry["version"] == "2" and entry["reason"] == "MemoryError: out of memory while building the engine"


def series(server: Any, model: str = "tiny") -> list[str]:
    """The /metrics sample lines of ``model``, as a scraper sees them."""
    with urllib.request.urlopen(f"http://{server.http_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if not line.startswith("#") and f'model="{model}"' in line]


def test_the_series_of_a_version_that_leaves_the_policy_or_is_unloaded_leave_metrics(
    start_server: Callable[..., Any],
    tiny_artifact: artifacts.Artifact,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
) -> None:
    server = start_server(tiny_artifact.repository, ADMIN_SETTINGS, http=True)
    assert served_version(server.http_url) == "1"
    bad = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    assert post(server.http_url, "/v2/models/tiny/infer", bad.encode())[0] == 400
    assert any('reason="invalidinput",version="1"' in line for line in series(server))
    artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model)

    assert post(server.http_url, "/v2/repository/models/tiny/load")[0] == 200  # latest 1: version 1 leaves

    lines = series(server)
    assert lines and not [line for line in lines if 'version="1"' in line], lines
    assert served_version(server.http_url) == "2"

    assert post(server.http_url, "/v2/repository/models/tiny/unload")[0] == 200
    assert series(server) == []

    assert post(server.http_url, "/v2/repository/models/tiny/load")[0] == 200  # a load starts from zero
    assert 'kiln_requests_total{model="tiny",outcome="success",version="2"} 0.0' in series(server)
    stats = server.plane.statistics("tiny", None)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 0


@pytest.mark.parametrize("version", ["+9", "1_0", " 9", "\u0669"])  # U+0669: ARABIC-INDIC DIGIT NINE
def test_a_version_that_is_not_ascii_digits_is_not_found_not_served_by_another_version(
    start_server: Callable[..., Any],
    tiny_artifact: artifacts.Artifact,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
    version: str,
) -> None:
    for _ in range(9):  # versions 2 to 10; int() would read "1_0" as 10 and the others as 9
        artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model)
    server = start_server(tiny_artifact.repository, ServeSettings(version_policy_latest=2), http=True)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})

    path = f"/v2/models/tiny/versions/{urllib.parse.quote(version)}/infer"
    code, payload = post(server.http_url, path, body.encode())

    assert code == 400, payload  # a malformed value, as Triton answers (INVALID_ARG); it was a 404
    assert f'version "{version}" is not a version number' in payload["error"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("tiny", model_version=version)
    client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_load_that_fails_leaves_no_series_of_the_versions_it_built_and_discarded(
    start_server: Callable[..., Any],
    tiny_artifact: artifacts.Artifact,
    tiny_onnx_model: Path,
    make_manifest: Callable[..., artifacts.Manifest],
) -> None:
    settings = ServeSettings(admin_enabled=True, admin_keys=(ADMIN_KEY,), version_policy_latest=2)
    server = start_server(tiny_artifact.repository, settings, http=True)
    artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model)  # version 2: builds, then discarded
    corrupt_model_file(artifacts.write(tiny_artifact.repository, make_manifest(), tiny_onnx_model).path)

    assert post(server.http_url, "/v2/repository/models/tiny/load")[0] == 409

    assert {line.rpartition('version="')[2][0] for line in series(server)} == {"1"}
