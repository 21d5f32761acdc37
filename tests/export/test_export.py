"""`kiln export` on real sources: scikit-learn, PyTorch (both exporters), Hugging Face MiniLM and .onnx files."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.config import ExportSettings
from kiln.errors import (
    ConfigError,
    ExportError,
    InvalidInput,
    ModelNotFound,
    ParityError,
    UnknownFormat,
    UnsupportedOpError,
)
from kiln.export import export
from kiln.runtime import OrtEngine

Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def digits() -> tuple[Array, Array]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def fitted_pipeline(digits: tuple[Array, Array]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = digits
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x[:1200], y[:1200])


def test_a_fitted_estimator_exports_from_its_held_out_rows_alone(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any
) -> None:
    # the held-out rows fix the input width as example rows do; only a pickle's path used them, an object did not
    x, y = digits
    art = export(fitted_pipeline, out=tmp_path, name="digits", eval_data=(x[1200:], y[1200:]))
    assert art.manifest.signature.inputs[0].shape == (-1, 64) and art.manifest.eval_data["rows"] == len(x) - 1200
    with pytest.raises(InvalidInput, match=r"needs example rows .*`kiln export ... --dataset NAME`, or example_"):
        export(fitted_pipeline, out=tmp_path, name="digits")


def test_sklearn_pipeline_matches_predict_proba_at_any_batch(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any
) -> None:
    x, y = digits
    art = export(fitted_pipeline, out=tmp_path, name="digits", example_inputs=x[:64], eval_data=(x[1200:], y[1200:]))

    assert (art.name, art.version, art.manifest.task) == ("digits", 1, "classification")
    assert [s.name for s in art.manifest.signature.outputs] == ["label", "probabilities"]
    assert art.manifest.signature.inputs[0].shape == (-1, 64)
    engine = OrtEngine(art.model_path)
    for rows in (1, 7, 300):  # dynamic batch: none of these is the example's 64
        out = engine.run({"input": x[1200 : 1200 + rows]})
        np.testing.assert_allclose(
            out["probabilities"], fitted_pipeline.predict_proba(x[1200 : 1200 + rows]), atol=1e-4
        )
        np.testing.assert_array_equal(out["label"], fitted_pipeline.predict(x[1200 : 1200 + rows]))
    assert art.manifest.checks["parity"]["passed"] is True
    assert len(art.manifest.checks["parity"]["outputs"]["probabilities"]["shapes"]) == 2
    assert art.manifest.eval_data["rows"] == len(x) - 1200
    assert (tmp_path / "digits" / "config.pbtxt").is_file()


def test_second_export_is_a_new_version_and_keeps_the_first(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any
) -> None:
    x, _ = digits
    first = export(fitted_pipeline, out=tmp_path, name="digits", example_inputs=x[:16])
    before = first.model_path.read_bytes()
    second = export(fitted_pipeline, out=tmp_path, name="digits", example_inputs=x[:16])

    assert second.version == 2
    assert first.model_path.read_bytes() == before
    assert artifacts.versions(tmp_path / "digits") == [1, 2]


def _mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_torch_module_keeps_a_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    import torch

    module = _mlp()
    settings = ExportSettings(exporter=exporter)
    art = export(module, out=tmp_path, name="mlp", example_inputs=torch.randn(4, 8), settings=settings)

    engine = OrtEngine(art.model_path)
    name = art.manifest.signature.inputs[0].name
    for rows in (1, 33):
        x = np.random.default_rng(rows).normal(size=(rows, 8)).astype(np.float32)
        (out,) = engine.run({name: x}).values()
        with torch.no_grad():
            np.testing.assert_allclose(out, module(torch.from_numpy(x)).numpy(), atol=1e-5)
    assert art.manifest.provenance["source"]["framework"] == "pytorch"
    assert art.manifest.settings["export"]["exporter"] == exporter


def test_onnx_file_is_imported_as_a_checked_version(tmp_path: Path, tiny_onnx_model: Path) -> None:
    art = export(tiny_onnx_model, out=tmp_path / "repo", name="tiny")

    assert art.version == 1
    assert art.manifest.signature.inputs[0].shape == (-1, 4)
    assert art.manifest.provenance["opsets"]["ai.onnx"] == 17
    assert artifacts.load(tmp_path / "repo" / "tiny").sha256 == art.sha256
    # recorded as parity passed=False, exported by "dynamo" at no opset: nothing was compared or exported
    assert art.manifest.checks["parity"] == {
        "skipped": "an imported ONNX file has no source to compare with; it ran at input shapes input [1, 4]; "
        "input [3, 4]"
    }
    assert (art.manifest.settings["export"]["exporter"], art.manifest.settings["export"]["opset"]) == (
        "none (an ONNX file, imported)",
        17,
    )


def test_an_onnx_file_with_external_data_is_imported_whole(tmp_path: Path, tiny_onnx_model: Path) -> None:
    # only model.onnx was copied: the version failed to load ("External data path does not exist") once the source
    # directory was gone, and in ORT at once, while `kiln inspect` called it verified
    import shutil

    import onnx

    source = tmp_path / "src"
    source.mkdir()
    onnx.save(
        onnx.load(str(tiny_onnx_model)),
        str(source / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (source / "weights.bin").is_file()
    art = export(source / "model.onnx", out=tmp_path / "repo", name="ext")
    shutil.rmtree(source)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    expected = OrtEngine(tiny_onnx_model).run({"input": x})["probabilities"]
    loaded = artifacts.load(tmp_path / "repo" / "ext")
    np.testing.assert_allclose(OrtEngine(loaded.model_path).run({"input": x})["probabilities"], expected, rtol=1e-6)
    assert art.manifest.provenance["source"]["path"] == str((source / "model.onnx").resolve())


def test_an_onnx_file_is_imported_at_its_own_opset_and_another_is_refused(
    tmp_path: Path, tiny_onnx_model: Path
) -> None:
    # --opset 19 was ignored without a word: the version recorded 17
    with pytest.raises(
        ConfigError, match=r"opset 19 was asked for, but .* an ONNX file of opset 17, imported as it is"
    ):
        export(tiny_onnx_model, out=tmp_path / "repo", settings=ExportSettings(opset=19))
    assert not (tmp_path / "repo").exists()
    assert export(tiny_onnx_model, out=tmp_path / "repo", settings=ExportSettings(opset=17)).version == 1


def test_an_opset_newer_than_onnx_knows_is_refused_for_scikit_learn(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any
) -> None:
    # --opset 30 failed inside skl2onnx, whose advice was to check that every step has a registered converter
    x, y = digits
    with pytest.raises(ConfigError, match=r"opset 30 is newer than the installed onnx .* knows \(up to \d+\)"):
        export(fitted_pipeline, out=tmp_path / "repo", eval_data=(x, y), settings=ExportSettings(opset=30))
    assert not (tmp_path / "repo").exists()


def test_an_onnx_file_that_fails_at_a_batch_size_it_declares_is_an_export_error(tmp_path: Path) -> None:
    # input [b, 4] reshaped to [4, 4]: ONNX Runtime's failure was an "internal error", exit 1
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        initializer=[numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "shape")],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ExportError, match=r'"fixed.onnx" does not run at input shapes x \[1, 4\], which its inputs'):
        export(path, out=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


# --- bad inputs: each names the value, the rule and the fix, and writes nothing ------------------------------------


def test_missing_file_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        export(tmp_path / "nope.onnx", out=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_unknown_format_names_the_suffix_and_the_formats(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    with pytest.raises(UnknownFormat, match=r'suffix "\.txt".*\.onnx'):
        export(path, out=tmp_path / "repo")


def test_garbage_onnx_is_an_export_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00\x01 definitely not protobuf")
    with pytest.raises(ExportError, match=r"broken\.onnx"):
        export(path, out=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_pickle_is_refused_without_trust_pickle(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any
) -> None:
    path = tmp_path / "clf.pkl"
    path.write_bytes(pickle.dumps(fitted_pipeline))
    with pytest.raises(InvalidInput, match="--trust-pickle"):
        export(path, out=tmp_path / "repo", example_inputs=digits[0][:8])

    art = export(path, out=tmp_path / "repo", example_inputs=digits[0][:8], trust_pickle=True)
    assert art.name == "clf"


def test_unfitted_estimator_is_refused(tmp_path: Path, digits: tuple[Array, Array]) -> None:
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(InvalidInput, match="fit"):
        export(LogisticRegression(), out=tmp_path / "repo", example_inputs=digits[0][:8])


def test_unsupported_op_names_the_op_the_opset_and_the_fix(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("FancyGelu", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 3)])
    model.ir_version = 8
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))

    with pytest.raises(UnsupportedOpError, match=r'"FancyGelu".*opset 3.*custom-op') as caught:
        export(path, out=tmp_path / "repo")
    assert caught.value.details["op"] == "FancyGelu"
    assert not (tmp_path / "repo").exists()


def test_parity_failure_names_output_tolerance_and_worst_element_and_writes_nothing(tmp_path: Path) -> None:
    import torch

    class Sloppy(torch.nn.Module):
        """exp() of large values: ONNX Runtime and PyTorch differ in the last bits, which a zero tolerance sees."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x * 7.3).sum(dim=1, keepdim=True)

    settings = ExportSettings(exporter="torchscript", parity_atol=0.0, parity_rtol=0.0)
    example = torch.linspace(0, 9, 64 * 16).reshape(64, 16)
    with pytest.raises(ParityError) as caught:
        export(Sloppy(), out=tmp_path / "repo", example_inputs=example, settings=settings)

    message = str(caught.value)
    assert "atol=0" in message and "worst" in message
    assert caught.value.details["output"]
    assert not (tmp_path / "repo").exists()


# --- the real transformer -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm_artifact: artifacts.Artifact) -> None:
    from sentence_transformers import SentenceTransformer

    from kiln.data import english_corpus
    from kiln.export import bundled_minilm_path
    from kiln.runtime import text_encoder_for

    texts = english_corpus(48, offset=2000)
    expected = SentenceTransformer(str(bundled_minilm_path()), device="cpu").encode(texts, batch_size=16)
    got = text_encoder_for(minilm_artifact, OrtEngine(minilm_artifact.model_path)).encode(texts, batch_size=16)

    assert minilm_artifact.manifest.task == "embedding"
    assert got.shape == expected.shape == (48, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalisation is in the graph


# --- sources the happy path above does not cover ----------------------------------------------------------------------


def _head() -> Any:
    import torch

    class Head(torch.nn.Module):
        """forward()'s parameter is ``x``, not Kiln's input name ``input``."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.linear(x))

    torch.manual_seed(0)
    return Head().eval()


def test_dynamo_export_of_a_forward_whose_parameter_is_not_named_input_keeps_a_dynamic_batch(tmp_path: Path) -> None:
    import torch

    module = _head()
    art = export(module, out=tmp_path, name="head", example_inputs=torch.randn(4, 8))  # the default exporter

    assert art.manifest.settings["export"]["exporter"] == "dynamo"
    assert art.manifest.signature.inputs[0].shape == (-1, 8)
    engine = OrtEngine(art.model_path)
    for rows in (1, 9):
        x = np.random.default_rng(rows).normal(size=(rows, 8)).astype(np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(
                engine.run({"input": x})["output"], module(torch.from_numpy(x)).numpy(), atol=1e-5
            )


@pytest.mark.parametrize(
    ("exporter", "opset", "advice"),
    [
        ("torchscript", 3, r"outside 7..20, .*; pass --opset 7 \(or leave --opset out: 17 is the default\)"),
        ("torchscript", 21, r"outside 7..20, .*; pass --opset 20 \("),
        ("dynamo", 99, r"outside 18..\d+, .*; pass --opset \d+ \(or leave --opset out: 18 is the default\)"),
        # was raised to 18 without a word, and the manifest recorded 17
        ("dynamo", 17, r"outside 18..\d+, .*; pass --opset 18 or --exporter torchscript \(or leave --opset out"),
    ],
)
def test_an_opset_the_exporter_cannot_write_is_refused_with_one_it_can(
    tmp_path: Path, exporter: str, opset: int, advice: str
) -> None:
    import torch

    settings = ExportSettings(exporter=exporter, opset=opset)
    with pytest.raises(ConfigError, match=rf"opset {opset} is {advice}"):
        export(_mlp(), out=tmp_path, name="mlp", example_inputs=torch.randn(4, 8), settings=settings)
    assert not (tmp_path / "mlp").exists()


@pytest.mark.parametrize(("exporter", "written"), [("dynamo", 18), ("torchscript", 17)])
def test_the_manifest_records_the_opset_the_exporter_wrote(tmp_path: Path, exporter: str, written: int) -> None:
    import torch

    settings = ExportSettings(exporter=exporter)
    art = export(_mlp(), out=tmp_path, name="mlp", example_inputs=torch.randn(4, 8), settings=settings)
    assert art.manifest.settings["export"]["opset"] == art.manifest.provenance["opsets"]["ai.onnx"] == written


def test_a_dynamo_export_prints_no_torchvision_warnings(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Without torchvision the exporter warned four times on every export (every `kiln train` of a built-in model)."""
    import torch

    export(_mlp(), out=tmp_path, name="mlp", example_inputs=torch.randn(4, 8), settings=ExportSettings())
    assert "torchvision" not in capfd.readouterr().err


def test_a_torchscript_export_of_arange_indexing_prints_no_negative_index_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """MiniLM's attention mask indexes with aranges, and every `kiln export minilm` and text `kiln train` warned
    that negative indices would export wrongly; the parity gate's two shapes check what that warning guesses at."""
    import torch

    class Grid(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows, cols = torch.arange(x.shape[0]), torch.arange(x.shape[1])
            return x[rows[:, None], cols[None, :]] * 2

    settings = ExportSettings(exporter="torchscript")
    export(Grid(), out=tmp_path, name="grid", example_inputs=torch.randn(4, 8), settings=settings)
    assert "aten::index" not in capfd.readouterr().err


def test_loading_a_hugging_face_encoder_draws_no_progress_bar_and_leaves_the_setting_as_it_was(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from transformers.utils import logging as hf_logging

    from kiln.export import bundled_minilm_path, load_hf_encoder

    assert hf_logging.is_progress_bar_enabled()
    encoder = load_hf_encoder(bundled_minilm_path())
    assert encoder.config.hidden_size == 384 and encoder.config._attn_implementation == "eager"
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_float64_example_inputs_of_a_float32_module_are_cast_not_a_torch_crash(tmp_path: Path) -> None:
    module = _mlp()
    x64 = np.random.default_rng(0).normal(size=(4, 8))  # NumPy's default float64
    settings = ExportSettings(exporter="torchscript")
    art = export(module, out=tmp_path, name="mlp", example_inputs=x64, eval_data=(x64, None), settings=settings)

    assert art.manifest.signature.inputs[0].dtype == "FP32"
    assert art.manifest.checks["parity"]["passed"] is True


def test_classifier_without_predict_proba_is_exported_as_a_classifier(tmp_path: Path) -> None:
    from sklearn.datasets import load_wine
    from sklearn.svm import LinearSVC

    x, y = load_wine(return_X_y=True)
    x = x.astype(np.float32)
    clf = LinearSVC().fit(x[:150], y[:150])
    assert not hasattr(clf, "predict_proba")
    art = export(clf, out=tmp_path, name="svc", example_inputs=x[:32], eval_data=(x[150:], y[150:]))

    assert art.manifest.task == "classification"
    assert [s.name for s in art.manifest.signature.outputs] == ["label", "probabilities"]
    engine = OrtEngine(art.model_path)
    for rows in (1, 28):
        out = engine.run({"input": x[150 : 150 + rows]})
        np.testing.assert_array_equal(out["label"], clf.predict(x[150 : 150 + rows]))
        np.testing.assert_allclose(out["probabilities"], clf.decision_function(x[150 : 150 + rows]), atol=1e-4)


def test_a_classifier_fitted_on_class_names_is_named_and_scored_by_them(tmp_path: Path) -> None:
    # its labels were the dataset's target names in column order ("class_0" for "barbera"), and its accuracy on the
    # dataset's class ids read 0.0, which lets the accuracy guard pass any variant
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    from kiln.data import eval_set
    from kiln.fidelity import label_output, task_score

    x, y = load_wine(return_X_y=True)
    x, names = x.astype(np.float32), np.array(["barolo", "grignolino", "barbera"], dtype=object)[y]
    clf = LogisticRegression(max_iter=5000).fit(x[:150], names[:150])
    art = export(clf, out=tmp_path, name="wine", eval_data=(x[150:], names[150:]))  # object labels, as pandas gives
    assert art.manifest.postprocessing["labels"] == ["barbera", "barolo", "grignolino"] == list(clf.classes_)
    held_out = eval_set(art)  # loads without pickle
    outputs = art.manifest.signature.outputs
    scored = label_output(outputs, held_out.labels, "classification", scored="probabilities")
    assert scored == "label"
    predicted = OrtEngine(art.model_path).run(held_out.feeds)[scored]
    assert task_score(predicted, held_out.labels, "classification")["accuracy"] == clf.score(x[150:], names[150:])

    with pytest.raises(
        InvalidInput,
        match=r"held-out labels hold 0, 1, which LogisticRegression never predicts.*"
        r"'barbera', 'barolo', 'grignolino'",
    ):
        export(clf, out=tmp_path, name="wine", eval_data=(x[50:70], y[50:70]), labels=["class_0", "class_1", "class_2"])
    with pytest.raises(InvalidInput, match=r"3 labels \('a', 'b', 'c' ...\) name class ids 0..2.*name themselves"):
        export(clf, out=tmp_path, name="wine", example_inputs=x[:8], labels=["a", "b", "c"])
    assert artifacts.versions(tmp_path / "wine") == [1]


def test_a_classifier_fitted_on_some_class_ids_gets_their_names() -> None:
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    from kiln.export.sklearn import class_names

    x, y = load_wine(return_X_y=True)
    some = y != 1
    clf = LogisticRegression(max_iter=5000).fit(x[some], y[some])  # classes 0 and 2: columns 0 and 1
    assert class_names(clf, ["class_0", "class_1", "class_2"], y[some]) == ["class_0", "class_2"]
    assert class_names(clf, None, None) == ["0", "2"]
    assert class_names(LogisticRegression(max_iter=5000).fit(x, y), None, y) is None  # ids 0..K-1: their positions


# --- found by using the tools: each failed before its fix -------------------------------------------------------------


def test_a_linear_pipeline_has_one_opset_per_domain_so_the_quantizer_reads_it(tmp_path: Path) -> None:
    # skl2onnx listed the default domain twice for graphs of ai.onnx.ml operators (Scaler + LinearRegressor);
    # ORT's quantizers refused such a model with "Failed to find proper ai.onnx domain" instead of finding that
    # there was nothing to quantize
    import onnx
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kiln.data import bundled_dataset
    from kiln.errors import KilnError
    from kiln.optimize.passes import quantize_dynamic, quantize_static

    data = bundled_dataset("diabetes")
    model = make_pipeline(StandardScaler(), Ridge()).fit(data.x_train, data.y_train)
    art = export(model, out=tmp_path / "repo", name="ridge", example_inputs=data.x_test[:32])

    domains = [o.domain for o in onnx.load(str(art.model_path)).opset_import]
    assert sorted(domains) == sorted(set(domains))
    with pytest.raises(KilnError, match=r"no node was quantized.*LinearRegressor, Scaler"):
        quantize_dynamic(art.model_path, tmp_path / "int8.onnx", per_channel=True)
    calibration = [{"input": data.x_train[:16]}]
    for method in (
        "minmax",
        "entropy",
        "percentile",
    ):  # the histogram calibrators said "Histogram has not been collected"
        with pytest.raises(KilnError, match=r"no node was quantized.*LinearRegressor, Scaler"):
            quantize_static(art.model_path, tmp_path / "int8.onnx", calibration, art.manifest.signature, method=method)


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``review_factories`` on the import path with factories a user might point --model at."""
    (tmp_path / "review_factories.py").write_text(
        "import torch\n"
        "def mlp():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4))\n"
        "def cnn():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())\n"
        "def number():\n"
        "    return 42\n"
        "def sized(n):\n"
        "    return torch.nn.Linear(n, 2)\n"
        "def broken():\n"
        "    raise ValueError('no config.yaml beside the model')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "review_factories"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("number", r'"review_factories:number" returned an object of type int, not a torch\.nn\.Module'),
        ("sized", r"cannot be called without arguments \(missing a required argument: 'n'\)"),
        ("broken", r'"review_factories:broken" raised ValueError: no config\.yaml beside the model'),
    ],
)
def test_a_factory_that_does_not_build_a_module_is_invalid_input_not_a_crash(
    factories: str, factory: str, message: str
) -> None:
    from kiln.export.torch import load_factory

    with pytest.raises(InvalidInput, match=message):
        load_factory(f"{factories}:{factory}")


def test_weights_that_do_not_fit_the_factory_or_are_not_safetensors_are_invalid_input(
    tmp_path: Path, factories: str
) -> None:
    from safetensors.torch import save_file

    from kiln.export.torch import load_factory

    cnn_weights = tmp_path / "cnn.safetensors"
    save_file(load_factory(f"{factories}:cnn").state_dict(), str(cnn_weights))
    with pytest.raises(InvalidInput, match=r'cnn\.safetensors" does not fit the model built by .*0\.weight'):
        load_factory(f"{factories}:mlp", cnn_weights)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all" * 4)
    with pytest.raises(InvalidInput, match=r'junk\.safetensors" is not a readable safetensors file'):
        load_factory(f"{factories}:mlp", junk)


def test_example_inputs_the_module_cannot_take_are_invalid_input_naming_the_shape(
    tmp_path: Path, factories: str
) -> None:
    from kiln.export.torch import load_factory

    rows = np.zeros((8, 64), dtype=np.float32)  # digits rows for a CNN that wants (N, 1, H, W)
    with pytest.raises(InvalidInput, match=r"cannot run on the example inputs \(input \[8, 64\] float32\)"):
        export(load_factory(f"{factories}:cnn"), out=tmp_path / "repo", name="cnn", example_inputs=rows)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["../escaped", "team/model", ".hidden", ""])
def test_a_model_name_that_is_not_one_directory_of_the_repository_is_refused(
    tmp_path: Path, tiny_onnx_model: Path, name: str
) -> None:
    with pytest.raises(InvalidInput, match="is not a valid name"):
        export(tiny_onnx_model, out=tmp_path / "repo", name=name)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "escaped").exists()


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path: Path, tiny_onnx_model: Path) -> None:
    out = tmp_path / "repo"
    out.write_text("a file, not a repository")
    with pytest.raises(InvalidInput, match=r'--out ".*repo" is a file, not a model repository directory'):
        export(tiny_onnx_model, out=out, name="tiny")
    assert out.read_text() == "a file, not a repository"


def test_an_out_that_is_a_version_or_a_model_directory_is_refused(tmp_path: Path, tiny_onnx_model: Path) -> None:
    # the new model was written inside them: repo/tiny/1/other/1 in an "immutable" version, repo/tiny/other/1
    first = export(tiny_onnx_model, out=tmp_path / "repo", name="tiny")
    for out, what, up in (
        (first.path, "a version directory", "repo"),
        (first.path.parent, "a model directory", "repo"),
    ):
        with pytest.raises(InvalidInput, match=rf'--out ".*" is {what}, not a model repository; .* \(".*{up}"\)'):
            export(tiny_onnx_model, out=out, name="other")
    assert sorted(p.name for p in first.path.iterdir()) == ["kiln.json", "model.onnx"]
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["1", "config.pbtxt"]


def test_exporting_the_current_directory_names_the_model_after_it_not_the_repository_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `kiln export . --out repo` named the model "" (Path(".").name) and wrote versions into the repository root
    import shutil

    from transformers import BertConfig, BertModel

    from kiln.export import bundled_minilm_path

    model_dir = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=30522, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    BertModel(config).save_pretrained(str(model_dir))
    shutil.copyfile(bundled_minilm_path() / "tokenizer.json", model_dir / "tokenizer.json")
    monkeypatch.chdir(model_dir)
    art = export(".", out=tmp_path / "repo", settings=ExportSettings(parity_atol=1e-3))

    assert art.name == "tiny-bert"
    assert art.path == tmp_path / "repo" / "tiny-bert" / "1"
    assert artifacts.list_models(tmp_path / "repo") == ["tiny-bert"]


def test_held_out_rows_that_do_not_fit_an_onnx_file_are_refused_at_export(
    tmp_path: Path, tiny_onnx_model: Path
) -> None:
    # `kiln export tiny.onnx --dataset digits` stored 64-wide rows for a 4-wide model; optimize failed on them later
    rows = np.zeros((10, 64), dtype=np.float32)
    with pytest.raises(InvalidInput, match=r'shape \[10, 64\] but input "input" of .* takes \[-1, 4\]'):
        export(tiny_onnx_model, out=tmp_path / "repo", name="tiny", eval_data=(rows, np.zeros(10, dtype=np.int64)))
    assert not (tmp_path / "repo").exists()


def test_held_out_rows_that_do_not_fit_a_python_model_are_refused_at_export(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any
) -> None:
    # the API stored 10-wide held-out rows for a 64-wide model: that version could never be optimized or benchmarked
    import torch

    x, y = digits
    with pytest.raises(InvalidInput, match=r'shape \[100, 10\] but input "input" of model "mlp" takes \[-1, 8\]'):
        export(_mlp(), out=tmp_path, name="mlp", example_inputs=torch.randn(4, 8), eval_data=(x[:100, :10], y[:100]))
    with pytest.raises(InvalidInput, match=r'shape \[100, 10\] but input "input" of model "digits" takes \[-1, 64\]'):
        export(fitted_pipeline, out=tmp_path, name="digits", example_inputs=x[:8], eval_data=(x[:100, :10], y[:100]))
    assert not (tmp_path / "mlp").exists() and not (tmp_path / "digits").exists()
    art = export(fitted_pipeline, out=tmp_path, name="digits", example_inputs=x[:8])
    assert (art.manifest.settings["export"]["exporter"], art.manifest.settings["export"]["opset"]) == ("skl2onnx", 17)


def test_example_rows_of_another_width_than_the_estimator_was_fitted_on_are_invalid_input(
    tmp_path: Path, fitted_pipeline: Any
) -> None:
    # skl2onnx's "Mismatch between expected shape" came out as "check that every step has a registered converter"
    from kiln.data import bundled_dataset

    iris = bundled_dataset("iris")
    with pytest.raises(InvalidInput, match=r"fitted on 64 features per row but the example inputs have 4"):
        export(fitted_pipeline, out=tmp_path / "repo", name="digits", example_inputs=iris.x_test)


def test_a_new_version_with_other_inputs_or_outputs_is_refused(tmp_path: Path, tiny_onnx_model: Path) -> None:
    # a model taking [-1, 1, 8, 8] became v2 of one taking [-1, 64]: config.pbtxt was rewritten for it, so Triton
    # could no longer load v1, and kiln bench refused the two as versions of one model
    import onnx

    export(tiny_onnx_model, out=tmp_path / "repo", name="tiny")
    wider = onnx.load(str(tiny_onnx_model))
    wider.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    wider.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(np.ones((5, 3), dtype=np.float32), wider.graph.initializer[0].name)
    )
    path = tmp_path / "wider.onnx"
    onnx.save(wider, str(path))
    with pytest.raises(
        InvalidInput,
        match=r'model "tiny" v1 takes input FP32 \[-1, 4\] -> probabilities FP32 '
        r"\[-1, 3\], but this export takes input FP32 \[-1, 5\] .* under another --name",
    ):
        export(path, out=tmp_path / "repo", name="tiny")
    assert artifacts.versions(tmp_path / "repo" / "tiny") == [1]
    assert export(path, out=tmp_path / "repo", name="tiny-5").version == 1
    assert export(tiny_onnx_model, out=tmp_path / "repo", name="tiny").version == 2  # the same signature: fine


@pytest.mark.parametrize(
    ("change", "message"),
    [  # each was a bare ValueError from NumPy or scikit-learn, or a misleading refusal
        ({"eval_data": "x"}, r"eval_data is a ndarray; pass a pair \(x, y\)"),  # unpacked as rows 0 and 1
        ({"eval_data": "x, y, extra"}, r"eval_data is a tuple of 3; pass a pair"),  # the third was ignored
        ({"eval_data": "nan"}, r"eval_data holds NaN or infinite values"),  # bench then reported NaN errors
        ({"example_inputs": "nan"}, r"example_inputs hold NaN or infinite values"),
        ({"example_inputs": "none"}, r"example_inputs hold no rows"),
        ({"example_inputs": "strings"}, r"example_inputs are not numbers"),
    ],
)
def test_held_out_and_example_rows_that_cannot_serve_are_refused(
    tmp_path: Path, digits: tuple[Array, Array], fitted_pipeline: Any, change: dict[str, str], message: str
) -> None:
    x, y = digits
    nan_x = x[:40].copy()
    nan_x[0, 0] = np.nan
    choices: dict[str, Any] = {
        "x": x[:40],
        "x, y, extra": (x[:40], y[:40], "extra"),
        "nan": (nan_x, y[:40]) if "eval_data" in change else nan_x,
        "none": x[:0],
        "strings": np.array([["a"] * 64] * 3),
    }
    kwargs: dict[str, Any] = {"example_inputs": x[:8]} | {key: choices[value] for key, value in change.items()}
    with pytest.raises(InvalidInput, match=message):
        export(fitted_pipeline, out=tmp_path / "repo", name="digits", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_a_torch_example_without_a_batch_axis_is_refused(tmp_path: Path) -> None:
    # a 1-D example made its feature axis the batch axis: "mat1 and mat2 shapes cannot be multiplied" in the parity run
    import torch

    with pytest.raises(InvalidInput, match=r'example input "input" has shape \[8\], no batch axis: .* x\[None\]'):
        export(_mlp(), out=tmp_path / "repo", name="mlp", example_inputs=torch.randn(8))
