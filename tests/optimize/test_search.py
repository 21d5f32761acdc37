"""The accuracy-guarded search on real models: what it writes, what it rejects and why, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.config import BenchSettings, OptimizeSettings
from kiln.errors import AccuracyBudgetError, ArtifactError, CalibrationError, ConfigError
from kiln.export import export
from kiln.optimize import optimize

# Small measurement settings: these tests check decisions and provenance, not speed (that is bench/'s job).
QUICK = {"batch_sizes": (1, 8), "target_batch_size": 8, "measure_repeats": 2, "eval_samples": 256}


@pytest.fixture
def digits_mlp(tmp_path: Path) -> artifacts.Artifact:
    """A real MLP classifier on the bundled digits, exported with its held-out set (the guard's data)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    model = make_pipeline(MinMaxScaler(), MLPClassifier((128,), max_iter=600, random_state=0)).fit(x[:1400], y[:1400])
    return export(model, out=tmp_path / "repo", name="digits", example_inputs=x[:32], eval_data=(x[1400:], y[1400:]))


def test_size_objective_writes_an_int8_child_with_full_provenance(digits_mlp: artifacts.Artifact) -> None:
    settings = OptimizeSettings(recipes=("int8-dynamic-per-channel",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(digits_mlp, settings=settings)

    child = result.chosen
    assert child is not None and child.version == 2
    assert child.model_path.stat().st_size < digits_mlp.model_path.stat().st_size
    prov = child.manifest.provenance
    assert prov["parent"] == digits_mlp.ref()
    assert prov["transforms"][-1]["name"] == "int8-dynamic-per-channel"
    fidelity = child.manifest.checks["fidelity"]
    assert fidelity["against"] == digits_mlp.ref() and fidelity["accuracy"] >= 0.9
    bench = child.manifest.benchmarks[0]
    assert bench["target_batch_size"] == 8 and bench["speedup"] > 0 and "cpu" in bench["hardware"]
    assert child.manifest.settings["optimize"]["objective"] == "size"
    assert (child.path / "assets" / "heldout.npz").is_file()  # the child can be guarded and benched in turn
    assert artifacts.load(child.path.parent).version == 2  # sha256 verified on load
    # quantizing it again was refused as not applying "on this hardware"
    with pytest.raises(ConfigError, match=r'"int8-dynamic-per-channel" does not apply .* version 2 is already INT8'):
        optimize(child, settings=settings)


def test_a_variant_that_is_not_faster_is_rejected_with_the_reason_and_nothing_is_written(
    digits_mlp: artifacts.Artifact, tmp_path: Path
) -> None:
    settings = OptimizeSettings(recipes=("ort-extended", "int8-dynamic-per-channel"), min_speedup=1e6, **QUICK)  # type: ignore[arg-type]
    result = optimize(digits_mlp, settings=settings)

    assert result.chosen is None
    assert [c.status for c in result.candidates] == ["rejected", "rejected"]
    for candidate in result.candidates:
        assert candidate.reason.startswith("not faster than its parent here"), candidate.reason
        assert candidate.speed and candidate.parent_speed and candidate.figures
    assert artifacts.versions(digits_mlp.path.parent) == [1]
    report = json.loads(result.write_json(tmp_path / "search.json").read_text())
    assert {c["recipe"]["name"] if isinstance(c["recipe"], dict) else c["recipe"] for c in report["candidates"]} == {
        "ort-extended",
        "int8-dynamic-per-channel",
    }


def test_an_unattainable_budget_says_the_best_found_and_changes_nothing(digits_mlp: artifacts.Artifact) -> None:
    settings = OptimizeSettings(recipes=("int8-dynamic-per-channel",), max_accuracy_drop=-0.5, **QUICK)  # type: ignore[arg-type]
    with pytest.raises(AccuracyBudgetError, match=r"best found was int8-dynamic-per-channel with accuracy 0\.\d+"):
        optimize(digits_mlp, settings=settings)
    assert artifacts.versions(digits_mlp.path.parent) == [1]


def test_calibration_of_the_wrong_shape_names_the_input_and_the_shapes(digits_mlp: artifacts.Artifact) -> None:
    settings = OptimizeSettings(recipes=("int8-static-minmax",), **QUICK)  # type: ignore[arg-type]
    wrong: list[dict[str, Any]] = [{"input": np.zeros((4, 3), dtype=np.float32)}]
    with pytest.raises(CalibrationError, match=r'"input".*64') as caught:
        optimize(digits_mlp, settings=settings, calibration=wrong)
    assert "3" in str(caught.value)
    assert artifacts.versions(digits_mlp.path.parent) == [1]


def test_static_int8_calibrates_itself_from_the_held_out_set_and_keeps_accuracy(digits_mlp: artifacts.Artifact) -> None:
    settings = OptimizeSettings(recipes=("int8-static-minmax",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(digits_mlp, settings=settings)

    (candidate,) = result.candidates
    assert candidate.figures["accuracy"] > 0.8, candidate.reason
    (step,) = candidate.history
    assert step["pass"] == "int8_static" and step["facts"]["quantized_nodes"] > 0
    assert step["facts"]["calibration_batches"] >= 1  # no --calibration given: it came from the held-out set


def test_a_spent_time_budget_skips_the_remaining_recipes(digits_mlp: artifacts.Artifact) -> None:
    settings = OptimizeSettings(recipes=("ort-extended",), time_budget_s=1e-9, **QUICK)  # type: ignore[arg-type]
    result = optimize(digits_mlp, settings=settings)
    assert [(c.status, c.reason) for c in result.candidates] == [("skipped", "time budget of 1e-09 s spent")]
    assert result.chosen is None


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("objective", "fast", '"speed" or "size"'),
        ("max_accuracy_drop", 5.0, r"\(-1, 1\]"),
        ("batch_sizes", (), "positive integers"),
    ],
)
def test_settings_outside_their_rules_are_config_errors(field: str, value: Any, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule):
        OptimizeSettings(**{field: value})


@pytest.mark.slow
def test_minilm_guard_rejects_per_tensor_int8_and_keeps_per_channel(minilm_artifact: artifacts.Artifact) -> None:
    settings = OptimizeSettings(
        recipes=("fused-int8-dynamic", "fused-int8-dynamic-per-channel", "fused-uint8-dynamic-per-channel"),
        eval_samples=64,
        batch_sizes=(8,),
        target_batch_size=8,
        measure_repeats=1,
        min_speedup=1e6,  # decide on the guard only; nothing is written
    )
    result = optimize(minilm_artifact, settings=settings)

    per_tensor, per_channel, unsigned = result.candidates
    assert per_tensor.status == "rejected" and per_tensor.reason.startswith("accuracy guard: mean cosine")
    assert per_tensor.figures["mean_cosine"] < 0.99
    assert per_channel.figures["mean_cosine"] >= 0.99, per_channel.reason
    assert per_channel.figures["top10_overlap"] > 0.8
    assert unsigned.history[-1]["settings"]["weight_type"] == "uint8"
    assert unsigned.history[-1]["facts"]["quantized_nodes"] > 0 and unsigned.figures["mean_cosine"] > 0.9
    fused = " ".join(result.fusions())
    assert "Attention x6" in fused and "SkipLayerNormalization" in fused
    assert artifacts.versions(minilm_artifact.path.parent) == [1]


def test_float64_calibration_is_cast_to_the_input_dtype_and_quantizes(digits_mlp: artifacts.Artifact) -> None:
    from sklearn.datasets import load_digits

    x = load_digits(return_X_y=True)[0][:128]  # float64, as np.savez of a default NumPy array keeps it
    settings = OptimizeSettings(recipes=("int8-static-minmax",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(digits_mlp, settings=settings, calibration=[{"input": x[i : i + 16]} for i in range(0, 128, 16)])

    (candidate,) = result.candidates
    assert candidate.figures, candidate.reason  # built and scored, not "does not apply to this graph"
    (step,) = candidate.history
    assert step["facts"]["quantized_nodes"] > 0 and step["facts"]["calibration_batches"] == 8


def test_calibration_of_another_dtype_kind_names_the_input_and_both_dtypes(digits_mlp: artifacts.Artifact) -> None:
    settings = OptimizeSettings(recipes=("int8-static-minmax",), **QUICK)  # type: ignore[arg-type]
    wrong: list[dict[str, Any]] = [{"input": np.zeros((4, 64), dtype=np.complex64)}]
    with pytest.raises(CalibrationError, match=r'"input" has dtype complex64; the model expects float32'):
        optimize(digits_mlp, settings=settings, calibration=wrong)


def test_calibration_with_an_array_the_model_does_not_take_or_nan_rows_is_a_calibration_error(
    digits_mlp: artifacts.Artifact,
) -> None:
    # both were read as "does not apply to this graph" (ORT's "Invalid input name" and "scale issue")
    settings = OptimizeSettings(recipes=("int8-static-minmax",), **QUICK)  # type: ignore[arg-type]
    rows = np.zeros((4, 64), dtype=np.float32)
    with pytest.raises(
        CalibrationError, match=r'has an array "other", which is not an input of the model \(its inputs'
    ):
        optimize(digits_mlp, settings=settings, calibration=[{"input": rows, "other": rows}])
    with pytest.raises(CalibrationError, match=r'"input" holds NaN or infinite values; calibrate on real, finite'):
        optimize(digits_mlp, settings=settings, calibration=[{"input": np.full((4, 64), np.nan, np.float32)}])


def test_calibration_with_no_static_recipe_to_use_it_is_refused(digits_mlp: artifacts.Artifact) -> None:
    # it was ignored without a word
    settings = OptimizeSettings(recipes=("int8-dynamic-per-channel",), **QUICK)  # type: ignore[arg-type]
    rows = np.zeros((4, 64), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"used by the int8-static-\* recipes only, and none of int8-dynamic-per-c"):
        optimize(digits_mlp, settings=settings, calibration=[{"input": rows}])


def test_optimize_and_bench_take_a_model_directory_as_the_cli_does(digits_mlp: artifacts.Artifact) -> None:
    # a path was "AttributeError: 'str' object has no attribute 'manifest'"
    from kiln.bench import bench

    settings = OptimizeSettings(recipes=("ort-extended",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(str(digits_mlp.path), settings=settings)
    assert result.parent_figures["accuracy"] > 0.9
    report = bench(
        [digits_mlp.path],
        settings=BenchSettings(batch_sizes=(1,), runs=2, warmup_runs=1, samples=32),
        include_source=False,
    )
    assert report.rows


def _unlabelled_mlp(tmp_path: Path, rows: int) -> artifacts.Artifact:
    """A torch MLP exported with ``rows`` held-out rows and no labels (the guard compares outputs, not accuracy)."""
    import torch

    from kiln.config import ExportSettings

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = np.random.default_rng(0).normal(size=(rows, 8)).astype(np.float32)  # every row distinct
    return export(
        module,
        out=tmp_path / "repo",
        name="mlp",
        example_inputs=x[:4],
        eval_data=(x, None),
        settings=ExportSettings(exporter="torchscript"),
    )


def test_static_int8_without_labels_calibrates_on_rows_the_guard_does_not_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.optimize import measure, passes

    parent = _unlabelled_mlp(tmp_path, rows=128)
    calibrated: list[np.ndarray[Any, Any]] = []
    scored: list[np.ndarray[Any, Any]] = []
    quantize_static, run = passes.quantize_static, measure.Workload.run

    def spy_quantize(src: Path, dst: Path, calibration: Any, *args: Any, **kwargs: Any) -> Any:
        calibrated.extend(feeds["input"] for feeds in calibration)
        return quantize_static(src, dst, calibration, *args, **kwargs)

    def spy_run(self: measure.Workload, *args: Any, **kwargs: Any) -> Any:
        assert self.data.feeds is not None
        scored.append(self.data.feeds["input"])
        return run(self, *args, **kwargs)

    monkeypatch.setattr(passes, "quantize_static", spy_quantize)
    monkeypatch.setattr(measure.Workload, "run", spy_run)
    settings = OptimizeSettings(recipes=("int8-static-minmax",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(parent, settings=settings)

    assert result.candidates[0].figures, result.candidates[0].reason  # it was built and scored
    calibration_rows = {row.tobytes() for batch in calibrated for row in batch}
    scored_rows = {row.tobytes() for batch in scored for row in batch}
    assert calibration_rows and scored_rows
    assert not calibration_rows & scored_rows


def test_static_int8_is_skipped_with_the_reason_when_the_held_out_set_is_too_small_to_split(tmp_path: Path) -> None:
    parent = _unlabelled_mlp(tmp_path, rows=6)
    settings = OptimizeSettings(recipes=("int8-static-minmax", "int8-dynamic-per-channel"), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(parent, settings=settings)

    static, dynamic = result.candidates
    assert static.status == "skipped"
    assert "6 rows" in static.reason and "--calibration" in static.reason
    assert dynamic.status != "skipped"


def test_the_pareto_front_is_over_the_objective_so_the_pick_is_on_it() -> None:
    # --objective size picked int8-dynamic-per-channel (3.5x smaller, 0.99x speed), left unmarked: the front was
    # over fidelity and speed whatever the objective
    from kiln.optimize.recipes import TENSOR_RECIPES
    from kiln.optimize.result import CandidateReport
    from kiln.optimize.search import _mark_front

    def report(score: float, speedup: float, size: int) -> CandidateReport:
        return CandidateReport(recipe=TENSOR_RECIPES[0], figures={"score": score}, speedup=speedup, size_bytes=size)

    fast_big, slow_small = report(0.97, 1.5, 100_000), report(0.97, 0.99, 30_000)
    _mark_front([fast_big, slow_small], "size")
    assert (fast_big.pareto, slow_small.pareto) == (False, True)
    _mark_front([fast_big, slow_small], "speed")
    assert (fast_big.pareto, slow_small.pareto) == (True, False)


# --- found by using the tools: each failed before its fix -------------------------------------------------------------


def test_the_guard_scores_a_classifier_whose_classes_are_not_0_to_k_minus_1_by_its_label_output(
    tmp_path: Path,
) -> None:
    # UCI wine's classes are 1, 2, 3: an argmax over probabilities (0, 1, 2) scored accuracy 0 for the parent and
    # every variant, so the guard let any variant through
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    from kiln.data import bundled_dataset

    data = bundled_dataset("wine")
    y_train, y_test = data.y_train + 1, data.y_test + 1
    model = make_pipeline(MinMaxScaler(), MLPClassifier((32,), max_iter=2000, random_state=0))
    model.fit(data.x_train, y_train)
    parent = export(
        model, out=tmp_path / "repo", name="wine", example_inputs=data.x_test, eval_data=(data.x_test, y_test)
    )
    settings = OptimizeSettings(recipes=("int8-dynamic-per-channel",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(parent, settings=settings)

    rows = data.x_test[: len(data.x_test) * 3 // 4]  # the guard scores the first three quarters
    expected = float(np.mean(model.predict(rows) == y_test[: len(rows)]))
    assert expected > 0.9
    assert result.parent_figures["accuracy"] == pytest.approx(expected)
    assert result.candidates[0].figures["accuracy"] > 0.9


def test_an_int8_recipe_that_quantizes_no_node_does_not_compete(tmp_path: Path) -> None:
    # a graph without MatMul/Gemm/Conv came out of ORT's quantizer unchanged, and that copy could be chosen as
    # "int8-dynamic-per-channel" by timer noise or a few bytes of size
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["relu"]), helper.make_node("Softmax", ["relu"], ["probabilities"])],
        "no_weights",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    parent = export(path, out=tmp_path / "repo", name="relu", eval_data=(x, None))
    settings = OptimizeSettings(recipes=("int8-dynamic-per-channel",), objective="size", **QUICK)  # type: ignore[arg-type]
    result = optimize(parent, settings=settings)

    (candidate,) = result.candidates
    assert result.chosen is None and candidate.status == "rejected"
    assert "no node was quantized" in candidate.reason and "Relu, Softmax" in candidate.reason
    assert artifacts.versions(parent.path.parent) == [1]
    # nor a graph optimization that changed no node: a copy, larger by ORT's metadata, chosen once by timer noise
    settings = OptimizeSettings(recipes=("ort-extended",), objective="size", **QUICK)  # type: ignore[arg-type]
    (candidate,) = optimize(parent, settings=settings).candidates
    assert candidate.status == "rejected" and candidate.reason == (
        "does not apply to this graph: ONNX Runtime's extended graph optimizations changed no node of this graph "
        "(Relu x1, Softmax x1)"
    )
    assert artifacts.versions(parent.path.parent) == [1]


def test_a_calibration_file_without_arrays_or_with_a_scalar_is_a_calibration_error(tmp_path: Path) -> None:
    from kiln.optimize import load_calibration

    np.savez(tmp_path / "empty.npz")
    with pytest.raises(CalibrationError, match=r'"[^"]*empty\.npz" holds no arrays'):
        load_calibration(tmp_path / "empty.npz")
    np.savez(tmp_path / "scalar.npz", input=np.float32(3.0))
    with pytest.raises(CalibrationError, match=r'calibration array "input" in "[^"]*scalar\.npz" is a scalar'):
        load_calibration(tmp_path / "scalar.npz")


def test_a_misspelt_recipe_is_told_the_closest_recipe_that_applies(digits_mlp: artifacts.Artifact) -> None:
    # "int8-dynamc" was told "fused-int8-dynamic", a transformer recipe that does not apply to a tabular model
    with pytest.raises(ConfigError, match=r'did you mean "int8-dynamic-per-channel"\?'):
        optimize(digits_mlp, settings=OptimizeSettings(recipes=("int8-dynamc",), **QUICK))  # type: ignore[arg-type]


def test_held_out_data_of_the_wrong_shape_is_refused_naming_the_input_and_both_shapes(
    digits_mlp: artifacts.Artifact,
) -> None:
    from kiln.data import EvalSet
    from kiln.errors import InvalidInput

    wrong = EvalSet(feeds={"input": np.zeros((40, 5), dtype=np.float32)}, labels=np.zeros(40, dtype=np.int64))
    with pytest.raises(
        InvalidInput, match=r'held-out input "input" has shape \[40, 5\]; model "digits" takes \[-1, 64\]'
    ):
        optimize(digits_mlp, settings=OptimizeSettings(**QUICK), eval_data=wrong)  # type: ignore[arg-type]
    assert artifacts.versions(digits_mlp.path.parent) == [1]


@pytest.mark.parametrize(
    ("labels", "message"),
    [  # labels 1..10 for classes 0..9 scored 0.0 for the parent and every variant, and the guard chose any of them
        (
            lambda y: y + 1,
            r'held-out labels hold 10, which the model\'s "label" output never gives: its classes are 0,',
        ),
        (lambda y: np.stack([y, y], axis=1), r"held-out labels have shape \[\d+, 2\]; .* one class per row"),
    ],
)
def test_held_out_labels_the_classifier_cannot_give_are_refused_before_the_search(
    digits_mlp: artifacts.Artifact, labels: Any, message: str
) -> None:
    from sklearn.datasets import load_digits

    from kiln.data import EvalSet
    from kiln.errors import InvalidInput

    x, y = load_digits(return_X_y=True)
    shifted = EvalSet(feeds={"input": x[1400:].astype(np.float32)}, labels=labels(y[1400:]))
    with pytest.raises(InvalidInput, match=message):
        optimize(digits_mlp, settings=OptimizeSettings(**QUICK), eval_data=shifted)  # type: ignore[arg-type]
    assert artifacts.versions(digits_mlp.path.parent) == [1]
    assert digits_mlp.manifest.postprocessing["classes"] == list(range(10))
    # (x, y), as export_model takes held-out data, reaches the same check (it was an AttributeError)
    with pytest.raises(InvalidInput, match=message):
        optimize(digits_mlp, settings=OptimizeSettings(**QUICK), eval_data=(x[1400:], labels(y[1400:])))  # type: ignore[arg-type]


def test_a_copied_model_directory_is_refused_rather_than_optimized_into_the_original(
    digits_mlp: artifacts.Artifact,
) -> None:
    # `cp -r repo/digits repo/digits-exp; kiln optimize repo/digits-exp` wrote the variant as digits v2
    import shutil

    copy = digits_mlp.path.parent.with_name("digits-exp")
    shutil.copytree(digits_mlp.path.parent, copy)
    with pytest.raises(ArtifactError, match=r'is a version of model "digits" .* in a directory named "digits-exp"'):
        optimize(copy, settings=OptimizeSettings(**QUICK))  # type: ignore[arg-type]
    assert artifacts.versions(digits_mlp.path.parent) == [1] and artifacts.versions(copy) == [1]


def test_optimize_leaves_a_callers_root_logger_as_it_was(tmp_path: Path) -> None:
    # ONNX Runtime's quantizer warned through logging.warning(), which gave the caller's bare root logger a stderr
    # handler: their own logging.basicConfig() then did nothing (a fresh process: pytest configures logging)
    import subprocess
    import sys

    script = f"""
import logging
import numpy as np
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
import kiln
from kiln.config import OptimizeSettings
x, y = load_digits(return_X_y=True)
x = x.astype(np.float32)
model = MLPClassifier((32,), max_iter=50, random_state=0).fit(x[:1000], y[:1000])
out = {str(tmp_path / "repo")!r}
art = kiln.export_model(model, out=out, name="d", example_inputs=x[:8], eval_data=(x[1000:], y[1000:]))
settings = OptimizeSettings(recipes=("int8-dynamic-per-channel",), objective="size", batch_sizes=(8,),
                            target_batch_size=8, measure_repeats=1, eval_samples=64)
kiln.optimize_model(art, settings=settings)
print("handlers", logging.getLogger().handlers)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "handlers []" in done.stdout and "WARNING:root" not in done.stderr, (done.stdout, done.stderr)
