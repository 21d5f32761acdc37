"""kiln.artifact: layout, versions, integrity, atomic writes, Triton config."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import artifact as artifacts
from kiln._utils import sha256_file
from kiln.errors import ArtifactError, IntegrityError, InvalidInput, ModelNotFound
from kiln.types import Signature, TensorSpec

MakeManifest = Callable[..., artifacts.Manifest]


def test_write_creates_triton_layout(repository: Path, tiny_artifact: artifacts.Artifact) -> None:
    model_dir = repository / "tiny"
    assert tiny_artifact.path == model_dir / "1"
    assert tiny_artifact.version == 1
    assert (model_dir / "1" / "model.onnx").is_file()
    assert (model_dir / "1" / "kiln.json").is_file()
    assert (model_dir / "config.pbtxt").is_file()
    assert tiny_artifact.repository == repository
    assert artifacts.list_models(repository) == ["tiny"]


def test_a_version_gets_the_modes_of_a_plain_mkdir_and_open(
    repository: Path, tiny_onnx_model: Path, make_manifest: Callable[..., artifacts.Manifest]
) -> None:
    # a server running as another user must be able to read the repository; tempfile alone gives 0700 and 0600
    # (under umask 022 a plain mkdir gives 0755 and open 0644; set here, or a 077 umask would hide the bug)
    previous = os.umask(0o022)
    try:
        artifact = artifacts.write(repository, make_manifest(), tiny_onnx_model)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(artifact.path.stat().st_mode) == 0o755
    for written in (artifact.path / "kiln.json", artifact.path / "model.onnx", repository / "tiny" / "config.pbtxt"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written


def test_manifest_records_sha256_and_signature(tiny_onnx_model: Path, tiny_artifact: artifacts.Artifact) -> None:
    on_disk = json.loads((tiny_artifact.path / "kiln.json").read_text(encoding="utf-8"))
    assert on_disk["format"] == artifacts.FORMAT
    assert on_disk["model"]["sha256"] == sha256_file(tiny_onnx_model)
    assert on_disk["model"]["size_bytes"] == tiny_onnx_model.stat().st_size
    assert on_disk["signature"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert on_disk["signature"]["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert tiny_artifact.sha256 == sha256_file(tiny_onnx_model)
    assert tiny_artifact.ref() == {"name": "tiny", "version": 1, "sha256": tiny_artifact.sha256}


def test_second_write_is_version_2_and_leaves_version_1_untouched(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest, tiny_artifact: artifacts.Artifact
) -> None:
    v1 = tiny_artifact.path
    before = {p.name: p.read_bytes() for p in v1.iterdir()}

    second = artifacts.write(repository, make_manifest(task="second"), tiny_onnx_model)

    assert second.version == 2
    assert second.path == repository / "tiny" / "2"
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == before
    assert artifacts.versions(repository / "tiny") == [1, 2]


def test_load_model_dir_picks_latest_version(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest, tiny_artifact: artifacts.Artifact
) -> None:
    artifacts.write(repository, make_manifest(task="second"), tiny_onnx_model)

    latest = artifacts.load(repository / "tiny")
    first = artifacts.load(repository / "tiny", version=1)
    via_manifest = artifacts.load(repository / "tiny" / "1" / "kiln.json")

    assert (latest.version, latest.manifest.task) == (2, "second")
    assert (first.version, first.manifest.task) == (1, "classification")
    assert via_manifest.path == tiny_artifact.path


def test_load_unknown_version_lists_the_existing_ones(repository: Path, tiny_artifact: artifacts.Artifact) -> None:
    with pytest.raises(ModelNotFound, match=r"has no version 7; it has versions \[1\]"):
        artifacts.load(repository / "tiny", version=7)


def test_tampered_model_file_fails_verification(tiny_artifact: artifacts.Artifact) -> None:
    with tiny_artifact.model_path.open("ab") as fh:
        fh.write(b"\0")

    with pytest.raises(IntegrityError, match=r"model\.onnx\" has sha256 .*manifest records") as info:
        artifacts.load(tiny_artifact.path)
    assert str(tiny_artifact.model_path) in str(info.value)
    assert info.value.details["expected"] == tiny_artifact.sha256
    # verify=False is the explicit escape hatch (e.g. for a repair tool)
    assert artifacts.load(tiny_artifact.path, verify=False).version == 1


def test_missing_model_file_is_model_not_found(tiny_artifact: artifacts.Artifact) -> None:
    tiny_artifact.model_path.unlink()
    with pytest.raises(ModelNotFound, match="is missing; the artifact is incomplete"):
        artifacts.load(tiny_artifact.path)


def test_load_missing_path_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        artifacts.load(tmp_path / "nowhere")


def test_load_dir_without_artifact_is_model_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="holds no Kiln artifact"):
        artifacts.load(tmp_path / "empty")


def test_a_manifest_without_a_sha256_cannot_be_verified(tiny_artifact: artifacts.Artifact) -> None:
    # the message read "its manifest records None…"
    manifest_path = tiny_artifact.path / "kiln.json"
    data = json.loads(manifest_path.read_text())
    del data["model"]["sha256"]
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r'kiln.json" records no sha256 of model.onnx \(model.sha256\)'):
        artifacts.load(tiny_artifact.path)


def test_loading_a_repository_names_its_models(tiny_artifact: artifacts.Artifact) -> None:
    # `kiln inspect kiln-repo` said the repository "holds no Kiln artifact"
    with pytest.raises(ModelNotFound, match=r"is a model repository \(models: tiny\); pass one of its model dir"):
        artifacts.load(tiny_artifact.repository)


def test_load_rejects_foreign_manifest_format(tiny_artifact: artifacts.Artifact) -> None:
    manifest_path = tiny_artifact.path / "kiln.json"
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    data["format"] = "someone-else/9"
    manifest_path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ArtifactError, match="manifest format is 'someone-else/9'"):
        artifacts.load(tiny_artifact.path)


def test_load_rejects_corrupt_manifest(tiny_artifact: artifacts.Artifact) -> None:
    (tiny_artifact.path / "kiln.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="is not a valid Kiln manifest"):
        artifacts.load(tiny_artifact.path)


def test_failed_write_leaves_no_version_and_no_temp_dir(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        artifacts.write(
            repository, make_manifest(), tiny_onnx_model, assets={"labels.txt": tmp_path / "does-not-exist.txt"}
        )

    model_dir = repository / "tiny"
    leftovers = list(model_dir.iterdir()) if model_dir.exists() else []
    assert leftovers == []
    assert artifacts.versions(model_dir) == []


def test_failed_write_keeps_existing_versions_and_numbering(
    repository: Path,
    tiny_onnx_model: Path,
    make_manifest: MakeManifest,
    tiny_artifact: artifacts.Artifact,
    tmp_path: Path,
) -> None:
    config_before = (repository / "tiny" / "config.pbtxt").read_bytes()
    with pytest.raises(FileNotFoundError):
        artifacts.write(repository, make_manifest(), tiny_onnx_model, assets={"x": tmp_path / "missing"})

    assert sorted(p.name for p in (repository / "tiny").iterdir()) == ["1", "config.pbtxt"]
    assert (repository / "tiny" / "config.pbtxt").read_bytes() == config_before
    assert artifacts.write(repository, make_manifest(), tiny_onnx_model).version == 2


def test_assets_are_copied_or_written(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest, tmp_path: Path
) -> None:
    source_dir = tmp_path / "tok"
    source_dir.mkdir()
    (source_dir / "vocab.txt").write_text("[PAD]\nhello\n", encoding="utf-8")
    labels = tmp_path / "labels.json"
    labels.write_text('["a", "b", "c"]', encoding="utf-8")

    art = artifacts.write(
        repository,
        make_manifest(),
        tiny_onnx_model,
        assets={"tokenizer": source_dir, "labels.json": labels, "nested/blob.bin": b"\x00\x01"},
    )

    assert (art.assets_dir / "tokenizer" / "vocab.txt").read_text(encoding="utf-8") == "[PAD]\nhello\n"
    assert (art.assets_dir / "labels.json").read_text(encoding="utf-8") == '["a", "b", "c"]'
    assert (art.assets_dir / "nested" / "blob.bin").read_bytes() == b"\x00\x01"


def test_config_pbtxt_content(repository: Path, tiny_artifact: artifacts.Artifact) -> None:
    text = (repository / "tiny" / "config.pbtxt").read_text(encoding="utf-8")
    assert 'name: "tiny"' in text
    assert 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 64" in text
    # Triton's dims leave out the batch axis when max_batch_size > 0
    assert 'name: "input"\n    data_type: TYPE_FP32\n    dims: [ 4 ]' in text
    assert 'name: "probabilities"\n    data_type: TYPE_FP32\n    dims: [ 3 ]' in text
    assert "-1" not in text
    assert "dynamic_batching" in text


def test_config_pbtxt_honours_max_batch_size(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest
) -> None:
    artifacts.write(repository, make_manifest(), tiny_onnx_model, max_batch_size=8)
    assert "max_batch_size: 8\n" in (repository / "tiny" / "config.pbtxt").read_text(encoding="utf-8")


def test_triton_config_without_dynamic_batch_axis_keeps_full_dims() -> None:
    fixed = Signature(
        inputs=(TensorSpec("ids", "INT64", (1, 16)),),
        outputs=(TensorSpec("scores", "FP16", (1, 2)),),
    )
    text = artifacts.triton_config(artifacts.Manifest(name="fixed", signature=fixed), max_batch_size=64)
    assert "max_batch_size: 0" in text
    assert "data_type: TYPE_INT64\n    dims: [ 1, 16 ]" in text
    assert "data_type: TYPE_FP16\n    dims: [ 1, 2 ]" in text
    assert "dynamic_batching" not in text


def test_config_pbtxt_parses_as_triton_model_config(repository: Path, tiny_artifact: artifacts.Artifact) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    config = text_format.Parse(
        (repository / "tiny" / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig()
    )
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert [list(i.dims) for i in config.input] == [[4]]
    assert [list(o.dims) for o in config.output] == [[3]]


def test_a_tensor_of_the_batch_axis_alone_is_reshaped_to_nothing_so_triton_loads_the_config() -> None:
    # a classifier's label [-1] was written as dims [ 1 ] alone, which Triton reads as [-1, 1] and refuses
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    signature = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),),
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
    )
    text = artifacts.triton_config(artifacts.Manifest(name="iris", signature=signature), max_batch_size=64)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    label, probabilities = config.output
    assert (list(label.dims), label.HasField("reshape"), list(label.reshape.shape)) == ([1], True, [])
    assert (list(probabilities.dims), probabilities.HasField("reshape")) == ([3], False)
    assert not config.input[0].HasField("reshape")


def _triton_model_config_subset() -> type:
    """The part of Triton's ``ModelConfig`` proto that Kiln writes (field names and types as in
    ``model_config.proto``), so the text-format check runs even where tritonclient is not installed."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    opt, rep = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def message(name: str, *fields: tuple[str, int, int, str]) -> descriptor_pb2.DescriptorProto:
        proto = descriptor_pb2.DescriptorProto(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, start=1):
            proto.field.add(name=fname, number=number, type=ftype, label=label, type_name=type_name or None)
        return proto

    file = descriptor_pb2.FileDescriptorProto(name="kiln_test_model_config.proto", package="kilntest", syntax="proto3")
    data_type = file.enum_type.add(name="DataType")
    type_names = "INVALID BOOL UINT8 UINT16 UINT32 UINT64 INT8 INT16 INT32 INT64 FP16 FP32 FP64 STRING BF16"
    for number, name in enumerate(type_names.split()):
        data_type.value.add(name=f"TYPE_{name}", number=number)
    tensor = [
        ("name", field.TYPE_STRING, opt, ""),
        ("data_type", field.TYPE_ENUM, opt, ".kilntest.DataType"),
        ("dims", field.TYPE_INT64, rep, ""),
    ]
    file.message_type.extend(
        [
            message("All"),
            message("Latest", ("num_versions", field.TYPE_UINT32, opt, "")),
            message(
                "VersionPolicy",
                ("latest", field.TYPE_MESSAGE, opt, ".kilntest.Latest"),
                ("all", field.TYPE_MESSAGE, opt, ".kilntest.All"),
            ),
            message(
                "DynamicBatching",
                ("preferred_batch_size", field.TYPE_INT32, rep, ""),
                ("max_queue_delay_microseconds", field.TYPE_UINT64, opt, ""),
            ),
            message("Tensor", *tensor),
            message(
                "ModelConfig",
                ("name", field.TYPE_STRING, opt, ""),
                ("platform", field.TYPE_STRING, opt, ""),
                ("max_batch_size", field.TYPE_INT32, opt, ""),
                ("input", field.TYPE_MESSAGE, rep, ".kilntest.Tensor"),
                ("output", field.TYPE_MESSAGE, rep, ".kilntest.Tensor"),
                ("version_policy", field.TYPE_MESSAGE, opt, ".kilntest.VersionPolicy"),
                ("dynamic_batching", field.TYPE_MESSAGE, opt, ".kilntest.DynamicBatching"),
            ),
        ]
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("kilntest.ModelConfig"))


def test_config_pbtxt_is_valid_protobuf_text_format(repository: Path, tiny_artifact: artifacts.Artifact) -> None:
    from google.protobuf import text_format

    config = text_format.Parse(
        (repository / "tiny" / "config.pbtxt").read_text(encoding="utf-8"), _triton_model_config_subset()()
    )
    assert config.name == "tiny"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", 11, [4])]  # 11 = TYPE_FP32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("probabilities", 11, [3])]
    assert config.HasField("version_policy") and config.version_policy.HasField("all")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_a_version_without_its_manifest_is_an_artifact_error_naming_the_file(
    repository: Path, tiny_artifact: artifacts.Artifact
) -> None:
    (tiny_artifact.path / "kiln.json").unlink()
    with pytest.raises(ArtifactError, match=r'kiln\.json" is missing; .*export the model again') as info:
        artifacts.load(repository / "tiny", 1)
    assert str(tiny_artifact.path / "kiln.json") in str(info.value)


@pytest.mark.parametrize(("content", "kind"), [("[]", "a list"), ('"tiny"', "a string"), ("null", "null")])
def test_a_manifest_that_is_not_a_json_object_is_an_artifact_error(
    tiny_artifact: artifacts.Artifact, content: str, kind: str
) -> None:
    (tiny_artifact.path / "kiln.json").write_text(content, encoding="utf-8")
    with pytest.raises(ArtifactError, match=f"holds {kind}, not a JSON object; .*export the model again"):
        artifacts.load(tiny_artifact.path)


def test_a_manifest_field_of_the_wrong_json_type_is_an_artifact_error(tiny_artifact: artifacts.Artifact) -> None:
    manifest_path = tiny_artifact.path / "kiln.json"
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    data["model"] = ["model.onnx"]  # an object with "sha256" in a real manifest
    manifest_path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ArtifactError, match="is not a valid Kiln manifest"):
        artifacts.load(tiny_artifact.path)


def test_a_model_name_longer_than_the_file_system_allows_is_model_not_found(repository: Path) -> None:
    repository.mkdir()
    name = "m" * 300
    with pytest.raises(ModelNotFound, match="300 characters, longer than the file system allows"):
        artifacts.versions(repository / name)
    with pytest.raises(ModelNotFound, match="300 characters, longer than the file system allows"):
        artifacts.load(repository / name)


@pytest.mark.parametrize("name", ["../escaped", "team/model", ".hidden", "", "back\\slash"])
def test_write_refuses_a_model_name_that_is_not_one_plain_directory(
    tmp_path: Path, tiny_onnx_model: Path, make_manifest: Callable[..., artifacts.Manifest], name: str
) -> None:
    # every writer (export, train, optimize) goes through write(); export checked names, the others did not
    with pytest.raises(InvalidInput, match=f'model name "{re.escape(name)}" is not a valid name'):
        artifacts.write(tmp_path / "repo", make_manifest(name=name), tiny_onnx_model)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "repo").exists()


def test_a_train_run_with_a_name_that_is_not_a_plain_directory_is_refused_before_training() -> None:
    from kiln.train import TrainSettings

    with pytest.raises(InvalidInput, match=r'model name "\.\./x" is not a valid name.*name = "digits-cnn"'):
        TrainSettings(dataset="digits", name="../x")


def test_only_directories_named_as_write_names_them_are_versions(
    tmp_path: Path, tiny_onnx_model: Path, make_manifest: Callable[..., artifacts.Manifest]
) -> None:
    # "²" passed str.isdigit and then failed int(): every load, index and metadata call for the model was a 500
    art = artifacts.write(tmp_path / "repo", make_manifest(), tiny_onnx_model)
    for junk in ("²", "٣", "007", "1a"):
        (art.path.parent / junk).mkdir()
    assert artifacts.versions(art.path.parent) == [1]
    assert artifacts.load(art.path.parent).version == 1


def test_a_file_named_like_the_next_version_is_named_in_the_error(tiny_artifact: artifacts.Artifact) -> None:
    # after 100 identical retries: 'could not allocate a new version under "repo/tiny"', with no file named
    (tiny_artifact.path.parent / "2").write_text("a stray file")
    with pytest.raises(ArtifactError, match=r'"\S+/tiny/2" is a file where version 2 of model "tiny" would go; move'):
        artifacts.write(tiny_artifact.repository, tiny_artifact.manifest, tiny_artifact.model_path)
    assert (tiny_artifact.path.parent / "2").read_text() == "a stray file"
