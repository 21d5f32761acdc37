"""``kiln inspect`` prints the manifest's text as it is: paths and names are data, not rich markup."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import kiln


def tiny_artifact(tmp_path: Path, source_path: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln import artifact as artifacts
    from kiln.types import Signature, TensorSpec

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["scores"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    signature = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("scores", "FP32", (-1, 2)),)
    )
    manifest = artifacts.Manifest(
        name="tiny", signature=signature, provenance={"source": {"framework": "onnx", "path": source_path}}
    )
    return artifacts.write(tmp_path / "repo", manifest, tmp_path / "tiny.onnx").path


def test_inspect_prints_a_source_path_with_brackets_as_it_is(tmp_path: Path) -> None:
    source = "/data/runs/[v2]/model.onnx"
    version_dir = tiny_artifact(tmp_path, source)
    result = kiln("inspect", version_dir, env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    # rich read "[v2]" as a style tag: the path printed as "/data/runs//model.onnx"
    assert f"path={source}" in result.stdout, result.stdout
    assert "(verified)" in result.stdout


def test_export_prints_names_and_paths_with_brackets_and_help_shows_the_config_table(tmp_path: Path) -> None:
    version_dir = tiny_artifact(tmp_path, "x.onnx")

    out = tmp_path / "out[v2]"
    result = kiln("export", str(version_dir / "model.onnx"), "--out", str(out), "--name", "m[red]x")
    assert result.returncode == 0, result.stderr
    # rich read "[red]" and "[v2]" as tags: "exported mx v1 -> .../out/mx/1"
    assert f"exported m[red]x v1 -> {out / 'm[red]x' / '1'}" in result.stdout, result.stdout
    # quoted as a shell needs it ("[" globs): pasted unquoted, a name with a space split in two
    assert f"next: kiln optimize '{out / 'm[red]x'}'" in result.stdout
    spaced = kiln("export", str(version_dir / "model.onnx"), "--out", str(tmp_path / "r"), "--name", "my model")
    assert f"next: kiln optimize '{tmp_path / 'r' / 'my model'}'" in spaced.stdout, spaced.stdout
    for verb, table in (("export", "[export]"), ("optimize", "[optimize]"), ("serve", "[serve]")):
        assert f"TOML config file ({table} table)" in kiln(verb, "--help").stdout, verb  # was "( table)"


def test_inspect_refuses_a_manifest_that_does_not_describe_its_version(tmp_path: Path) -> None:
    # an edited kiln.json (input [-1, 32] for a graph taking [-1, 4]) and a missing tokenizer were shown under
    # "(verified)", which vouches for the model file's bytes only
    import json

    version_dir = tiny_artifact(tmp_path, "tiny.onnx")
    manifest_path = version_dir / "kiln.json"
    data = json.loads(manifest_path.read_text())
    good = json.dumps(data)
    data["signature"]["inputs"][0]["shape"] = [-1, 32]
    manifest_path.write_text(json.dumps(data))
    result = kiln("inspect", version_dir, env={"COLUMNS": "250"})
    assert result.returncode == 2, result.stderr
    assert "the manifest's inputs and outputs (input FP32 [-1, 32]; scores FP32 [-1, 2]) are not the graph's " in (
        result.stderr
    )
    data = json.loads(good)
    data["preprocessing"] = {"kind": "text", "tokenizer": "tokenizer/tokenizer.json", "max_length": 8}
    manifest_path.write_text(json.dumps(data))
    result = kiln("inspect", version_dir, env={"COLUMNS": "250"})
    assert result.returncode == 2 and 'the tokenizer file "' in result.stderr and "is missing" in result.stderr
    manifest_path.write_text(good)
    assert kiln("inspect", version_dir).returncode == 0
