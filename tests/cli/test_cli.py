"""The ``kiln`` command as users run it: a real subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import artifact as artifacts
from tests.helpers import kiln

EXIT_USER_ERROR = 2


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_verb() -> None:
    result = kiln("--help")
    assert result.returncode == 0
    for verb in ("export", "optimize", "bench", "inspect", "quickstart"):
        assert verb in result.stdout


def test_missing_file_is_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    assert_one_line_error(kiln("export", missing, "--out", tmp_path / "repo"), str(missing), "does not exist")

    for debug in (
        kiln("--debug", "export", missing, "--out", tmp_path / "repo"),
        kiln("export", missing, "--out", tmp_path / "repo", "--debug"),  # anywhere on the line, as the README says
    ):
        assert debug.returncode != 0
        assert "Traceback" in debug.stderr and "ModelNotFound" in debug.stderr


def test_an_error_that_quotes_brackets_prints_them(tmp_path: Path) -> None:
    # rich read "[laod]" and "[export], [optimize], ..." as markup and dropped them from the line
    config = tmp_path / "bad.toml"
    config.write_text("[laod]\nrates = 5\n")
    result = kiln("bench", "--url", "http://127.0.0.1:1", "--model", "x", "--config", config)
    assert_one_line_error(result, 'unknown table [laod] (did you mean "load"?)', "[export], [optimize], [bench]")


def test_export_then_inspect_as_table_and_json(tmp_path: Path, tiny_onnx_model: Path) -> None:
    repo = tmp_path / "repo"
    exported = kiln("export", tiny_onnx_model, "--out", repo, "--name", "tiny")
    assert exported.returncode == 0, exported.stderr

    table = kiln("inspect", repo / "tiny")
    assert table.returncode == 0, table.stderr
    assert "tiny" in table.stdout and "sha256" in table.stdout

    as_json = json.loads(kiln("inspect", repo / "tiny", "--json").stdout)
    assert as_json["name"] == "tiny" and as_json["version"] == 1
    assert as_json["model"]["sha256"] == artifacts.load(repo / "tiny").sha256


def test_export_of_an_onnx_file_with_a_dataset_records_its_task_and_class_names(
    tmp_path: Path, tiny_onnx_model: Path
) -> None:
    exported = kiln("export", tiny_onnx_model, "--dataset", "iris", "--out", tmp_path / "repo", "--name", "tiny")
    assert exported.returncode == 0, exported.stderr
    manifest = artifacts.load(tmp_path / "repo" / "tiny").manifest
    assert manifest.task == "classification"
    assert manifest.postprocessing["labels"] == ["setosa", "versicolor", "virginica"]
    assert manifest.eval_data["rows"] > 0


def test_tampered_model_file_is_refused_by_inspect(tiny_artifact: artifacts.Artifact) -> None:
    data = bytearray(tiny_artifact.model_path.read_bytes())
    data[-1] ^= 0xFF
    tiny_artifact.model_path.write_bytes(bytes(data))
    assert_one_line_error(kiln("inspect", tiny_artifact.path.parent), "sha256")


def test_pytorch_factory_with_safetensors_weights(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "my_models.py").write_text(
        "import torch\n\n"
        "def mlp():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
    )
    torch.manual_seed(1)
    trained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    save_file(trained.state_dict(), tmp_path / "mlp.safetensors")

    result = kiln(
        "export",
        "--model",
        "my_models:mlp",
        "--weights",
        tmp_path / "mlp.safetensors",
        "--example-shape",
        "4,8",
        "--out",
        tmp_path / "repo",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    art = artifacts.load(tmp_path / "repo" / "mlp")
    assert art.manifest.provenance["source"]["factory"] == "my_models:mlp"

    from kiln.runtime import OrtEngine

    x = torch.randn(5, 8)
    (out,) = OrtEngine(art.model_path).run({art.manifest.signature.inputs[0].name: x.numpy()}).values()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), trained(x), atol=1e-5, rtol=1e-4)  # the weights, not init


def test_a_factory_in_the_working_directory_is_found_by_the_console_script(tmp_path: Path) -> None:
    # `python -m kiln` puts the working directory on the import path; the installed `kiln` script did not
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(
        "import torch\n\ndef build_mlp():\n    return torch.nn.Sequential(torch.nn.Linear(8, 3))\n"
    )
    script = Path(sys.executable).parent / "kiln"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(script), "export", "--model", "mypkg.models:build_mlp", "--example-shape", "2,8", "--out", "repo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert artifacts.load(tmp_path / "repo" / "build_mlp").manifest.provenance["source"]["factory"] == (
        "mypkg.models:build_mlp"
    )


def test_a_model_exported_without_held_out_data_is_optimized_with_eval_data(tmp_path: Path) -> None:
    import numpy as np
    import torch

    (tmp_path / "my_models.py").write_text(
        "import torch\n\ndef mlp():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    exported = kiln("export", "--model", "my_models:mlp", "--example-shape", "4,8", "--out", tmp_path / "repo", env=env)
    assert exported.returncode == 0, exported.stderr
    art = artifacts.load(tmp_path / "repo" / "mlp")
    search = ("--recipes", "int8-dynamic-per-channel", "--batch-sizes", "1,8", "--target-batch-size", "8")
    assert_one_line_error(kiln("optimize", art.path.parent, *search), "has no held-out data", "--eval-data")

    x = np.random.default_rng(0).normal(size=(96, 8)).astype(np.float32)
    with torch.no_grad():
        sys.path.insert(0, str(tmp_path))
        try:
            import my_models  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(tmp_path))
        labels = my_models.mlp()(torch.from_numpy(x)).argmax(dim=1).numpy()
    np.savez(tmp_path / "held.npz", **{art.manifest.signature.inputs[0].name: x, "labels": labels})
    report = tmp_path / "search.json"
    done = kiln("optimize", art.path.parent, *search, "--eval-data", tmp_path / "held.npz", "--report", report)
    assert done.returncode in (0, EXIT_USER_ERROR), done.stderr  # chosen, or kept / over budget: judged either way
    (candidate,) = json.loads(report.read_text())["candidates"] if report.is_file() else [None]
    assert candidate is not None and "score" in candidate["fidelity"], done.stdout + done.stderr  # judged on them

    bad = kiln("optimize", art.path.parent, *search, "--eval-data", tmp_path / "nope.npz")
    assert_one_line_error(bad, "nope.npz", "does not exist")


def test_pickle_needs_trust_pickle(tmp_path: Path) -> None:
    import pickle

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    (tmp_path / "iris.pkl").write_bytes(pickle.dumps(LogisticRegression(max_iter=500).fit(x, y)))

    assert_one_line_error(
        kiln("export", tmp_path / "iris.pkl", "--dataset", "iris", "--out", tmp_path / "repo"), "--trust-pickle"
    )
    trusted = kiln("export", tmp_path / "iris.pkl", "--dataset", "iris", "--trust-pickle", "--out", tmp_path / "repo")
    assert trusted.returncode == 0, trusted.stderr
    assert artifacts.load(tmp_path / "repo" / "iris").manifest.eval_data["rows"] > 0


def test_optimize_unknown_recipe_suggests_the_closest_and_writes_nothing(tiny_artifact: artifacts.Artifact) -> None:
    model_dir = tiny_artifact.path.parent
    assert_one_line_error(kiln("optimize", model_dir, "--recipes", "int8-dynamic-per-chanel"), "did you mean")
    assert artifacts.versions(model_dir) == [1]


@pytest.fixture
def benchable_dir(repository: Path, tiny_onnx_model: Path, make_manifest: Callable[..., artifacts.Manifest]) -> Path:
    """The tiny classifier with a held-out set of 16 rows, so ``kiln bench`` can run on it."""
    import numpy as np

    from kiln.data import heldout_asset

    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    manifest = make_manifest(eval_data={"kind": "tabular", "file": "heldout.npz", "rows": len(x)})
    assets: dict[str, Path | bytes] = {"heldout.npz": heldout_asset({"input": x}, np.zeros(len(x), np.int64))}
    return artifacts.write(repository, manifest, tiny_onnx_model, assets=assets).path


def test_bench_report_dir_comes_from_the_environment_then_the_config_file(tmp_path: Path, benchable_dir: Path) -> None:
    config = tmp_path / "kiln.toml"
    config.write_text('[bench]\nreport_dir = "from-file"\n', encoding="utf-8")
    quick = ("bench", benchable_dir, "--batch-sizes", "1", "--runs", "1", "--warmup", "0", "--samples", "8")
    quick += ("--no-torch", "--config", config)

    from_env = kiln(*quick, cwd=tmp_path, env={"KILN_REPORT_DIR": str(tmp_path / "from-env")})
    assert from_env.returncode == 0, from_env.stderr
    assert (tmp_path / "from-env" / "bench.json").is_file()
    assert not (tmp_path / "from-file").exists() and not (tmp_path / "kiln-report").exists()

    from_file = kiln(*quick, cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    assert (tmp_path / "from-file" / "bench.json").is_file() and not (tmp_path / "kiln-report").exists()


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        (("--url", "http://127.0.0.1:1", "--model", "m", "--runs", "5", "--batch-sizes", "1"), "--batch-sizes, --runs"),
        (("--url", "http://127.0.0.1:1", "--model", "m", "--no-torch"), "--no-torch applies"),
        (("--url", "http://127.0.0.1:1", "--model", "m", "--closed-loop", "4", "--concurrency", "8"), "--concurrency"),
        (("--url", "http://127.0.0.1:1", "--model", "m", "--closed-loop", "4", "--rates", "10"), "--rates applies"),
        (("kiln-repo/tiny", "--rates", "10,20", "--model", "m"), "--model, --rates apply only with --url"),
        (("kiln-repo/tiny", "--json"), "--json applies only with --url"),
    ],
)
def test_bench_refuses_flags_of_the_other_mode(tmp_path: Path, args: tuple[str, ...], flags: str) -> None:
    assert_one_line_error(kiln("bench", *args, cwd=tmp_path), flags, "leave")


@pytest.mark.slow
def test_export_optimize_bench_road_with_an_unattainable_budget_first(tmp_path: Path) -> None:
    repo, report = tmp_path / "repo", tmp_path / "report"
    import pickle

    from sklearn.datasets import load_breast_cancer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    model = make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=1000, random_state=0)).fit(x, y)
    (tmp_path / "bc.pkl").write_bytes(pickle.dumps(model))
    assert (
        kiln("export", tmp_path / "bc.pkl", "--dataset", "breast_cancer", "--trust-pickle", "--out", repo).returncode
        == 0
    )

    unattainable = kiln("optimize", repo / "bc", "--max-accuracy-drop", "-0.5", "--recipes", "int8-dynamic-per-channel")
    assert_one_line_error(unattainable, "accuracy budget", "Nothing was written")
    assert artifacts.versions(repo / "bc") == [1]

    searched = kiln(
        "optimize", repo / "bc", "--batch-sizes", "1,8", "--target-batch-size", "8", "--report", tmp_path / "s.json"
    )
    assert searched.returncode == 0, searched.stderr
    assert "int8-static-minmax" in searched.stdout and (tmp_path / "s.json").is_file()

    benched = kiln("bench", repo / "bc", "--batch-sizes", "1,8", "--runs", "3", "--warmup", "1", "--report-dir", report)
    assert benched.returncode == 0, benched.stderr
    html = (report / "index.html").read_text()
    assert html.count("<svg") >= 2 and "onnxruntime" in benched.stdout.lower() + html.lower()
    assert json.loads((report / "bench.json").read_text())["rows"]
