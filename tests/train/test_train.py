"""``kiln.train.train`` on real bundled data and CSV files, and the clear errors bad input gets."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.data import bundled_dataset
from kiln.errors import ConfigError, InvalidInput
from kiln.train import Checkpointer, StepStats, TrainingDiverged, TrainSettings, load_train_settings, train
from kiln.train.settings import PAIR_DATASETS
from tests.helpers import write_csv

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "kiln" / "train" / "examples"


def test_iris_classification_learns_and_reports_progress(make_settings: Callable[..., TrainSettings]) -> None:
    seen: list[StepStats] = []
    result = train(make_settings(epochs=25, lr=1e-2, batch_size=16), on_step=seen.append)
    assert result.metrics["test_accuracy"] >= 0.85
    assert result.steps == 25 * 7 and [s.step for s in seen] == list(range(1, 176))  # 112 rows: 7 batches of 16
    assert seen[-1].eta_s == 0.0 and seen[0].eta_s > 0 and seen[-1].samples_per_s > 0
    assert seen[-1].loss < seen[0].loss
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000175.pt"


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_bf16_autocast_on_cpu_learns_and_exports_an_fp32_graph(
    make_settings: Callable[..., TrainSettings], model: str
) -> None:
    """Accelerate wraps the model's forward in autocast; exported through that wrapper, the graph held bf16 casts
    (the CNN's Conv in bf16, which ONNX Runtime refused to load)."""
    import numpy as np
    import onnx

    from kiln.runtime import OrtEngine
    from kiln.train.data import load_train_data

    settings = make_settings(
        dataset="digits", model=model, hidden_sizes=(16,), epochs=3, lr=3e-3, mixed_precision="bf16", device="cpu",
        export=True,
    )  # fmt: skip
    result = train(settings)
    assert result.metrics["test_accuracy"] >= 0.9
    assert result.artifact is not None
    graph = onnx.load(str(result.artifact.model_path)).graph
    dtypes = {a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert onnx.TensorProto.BFLOAT16 not in dtypes
    data = load_train_data("digits", test_fraction=settings.test_fraction, seed=settings.seed)
    (name,) = [spec.name for spec in result.artifact.manifest.signature.inputs]
    (logits,) = OrtEngine(result.artifact.model_path).run({name: data.x_test}).values()
    accuracy = float((np.asarray(logits).argmax(axis=1) == data.y_test).mean())
    assert accuracy == pytest.approx(result.metrics["test_accuracy"], abs=1 / len(data.y_test))


def test_bf16_runs_the_layers_in_bf16_and_keeps_fp32_weights(
    make_settings: Callable[..., TrainSettings], make_trainer: Callable[..., Any]
) -> None:
    from kiln.train.loop import make_accelerator

    settings = make_settings(dataset="digits", mixed_precision="bf16", device="cpu")
    trainer = make_trainer(settings, accelerator=make_accelerator("cpu", "bf16"))
    linear = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    linear.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    trainer.train_step()
    assert seen == [torch.bfloat16]  # autocast ran the layer in bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # the weights stay fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_gpu_learns(make_settings: Callable[..., TrainSettings], precision: str) -> None:
    """fp16 goes through Accelerate's gradient scaler (the non-plain path); bf16 through autocast alone."""
    result = train(make_settings(dataset="digits", epochs=3, lr=3e-3, mixed_precision=precision, device="cuda"))
    assert result.metrics["test_accuracy"] >= 0.9


def test_diabetes_regression_predicts_in_target_units(make_settings: Callable[..., TrainSettings]) -> None:
    result = train(make_settings(dataset="diabetes", epochs=30, lr=3e-3, hidden_sizes=(32,)))
    assert result.metrics["test_r2"] > 0.3
    assert 40 < result.metrics["test_rmse"] < 70  # the target spans 25..346; a mean predictor scores ~77


def test_a_run_puts_torchs_thread_count_back(make_settings: Callable[..., TrainSettings]) -> None:
    # cpu_threads = 1 left the caller's process at one thread after the run
    import torch

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    train(make_settings(dataset="iris", max_steps=2, cpu_threads=target))
    assert torch.get_num_threads() == before


def test_csv_with_string_labels_trains(make_settings: Callable[..., TrainSettings], wine_csv: Path) -> None:
    result = train(make_settings(dataset=str(wine_csv), target="cultivar", epochs=20, lr=1e-2))
    assert result.metrics["test_accuracy"] >= 0.85


def test_csv_unknown_column_suggests_the_closest(make_settings: Callable[..., TrainSettings], wine_csv: Path) -> None:
    with pytest.raises(InvalidInput, match=r'column "cultivr" is not in .*\(did you mean "cultivar"\?\)'):
        train(make_settings(dataset=str(wine_csv), target="cultivr"))


def test_csv_columns_of_one_name_and_features_named_twice_are_refused(
    make_settings: Callable[..., TrainSettings], wine_csv: Path
) -> None:
    # header "a,a,label" trained on the first "a" twice: the second column's values were never read
    lines = wine_csv.read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].replace("chem_1", "chem_0", 1)
    twice = wine_csv.with_name("twice.csv")
    twice.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match=r'"\S*twice.csv" has more than one column named \'chem_0\'; give each'):
        train(make_settings(dataset=str(twice), target="cultivar"))
    with pytest.raises(InvalidInput, match=r"features name 'chem_2' more than once; name each column once"):
        train(make_settings(dataset=str(wine_csv), target="cultivar", features=("chem_2", "chem_2")))


def test_csv_non_numeric_feature_names_line_and_column(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "bad.csv", [["a", "b", "y"], [1, 2, 0], [3, "n/a", 1], [5, 6, 0]])
    with pytest.raises(InvalidInput, match=r'line 3, column "b" holds \'n/a\', not a number'):
        train(make_settings(dataset=str(path), target="y"))


def test_csv_empty_target_cell_is_refused_not_made_a_class(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    # diabetes as a CSV with one target left blank: read as a class "", it turned the regression into a
    # classification over every distinct value (test accuracy 0.0)
    data = bundled_dataset("diabetes")
    rows: list[list[object]] = [[*map(float, x), float(y)] for x, y in zip(data.x_train, data.y_train, strict=True)]
    rows[6][-1] = ""
    path = write_csv(tmp_path / "diabetes.csv", [[f"f{i}" for i in range(10)] + ["progression"], *rows])
    with pytest.raises(InvalidInput, match=r'line 8 has no value in target column "progression" \(1 such row\)'):
        train(make_settings(dataset=str(path), target="progression"))


def test_a_target_with_one_class_is_refused(make_settings: Callable[..., TrainSettings], tmp_path: Path) -> None:
    path = write_csv(tmp_path / "one.csv", [["a", "b", "y"], *([i, i * 2, "spam"] for i in range(20))])
    with pytest.raises(InvalidInput, match=r"target column \"y\" of .* holds one class only \('spam'\)"):
        train(make_settings(dataset=str(path), target="y"))


def test_csv_from_a_spreadsheet_with_a_byte_order_mark_names_its_first_column(
    make_settings: Callable[..., TrainSettings], wine_csv: Path
) -> None:
    marked = wine_csv.with_name("excel.csv")
    marked.write_bytes(b"\xef\xbb\xbf" + wine_csv.read_bytes())
    result = train(make_settings(dataset=str(marked), target="cultivar", features=("chem_0", "chem_1"), max_steps=2))
    assert result.steps == 2


def test_csv_that_is_not_utf8_names_the_line(make_settings: Callable[..., TrainSettings], wine_csv: Path) -> None:
    latin = wine_csv.with_name("latin.csv")
    latin.write_bytes(wine_csv.read_bytes().replace(b"barbera", b"barb\xe9ra", 1))
    with pytest.raises(InvalidInput, match=r"line \d+ holds byte 0xe9, which is not UTF-8; save the file as UTF-8"):
        train(make_settings(dataset=str(latin), target="cultivar"))


def test_unknown_bundled_dataset_suggests_the_closest(make_settings: Callable[..., TrainSettings]) -> None:
    with pytest.raises(InvalidInput, match=r'dataset "digit" is not bundled \(did you mean "digits"\?\)'):
        train(make_settings(dataset="digit"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [  # each passed validation, then crashed as an internal error (scikit-learn's, NumPy's or torch's)
        ({"test_fraction": 0.999}, r"test_fraction 0.999 of 150 rows holds out 150 and trains on 0; the split needs"),
        ({"test_fraction": 0.99}, r"test_fraction 0.99 of 150 rows holds out 149 and trains on 1; the split needs"),
        ({"test_fraction": 0.001}, r"holds out 1 and trains on 149; .* and one of each of the 3 classes on each side"),
        ({"weight_decay": -1.0}, r"weight_decay is -1; it must be >= 0"),
        ({"optimizer": "sgd", "momentum": -1.0}, r"momentum is -1; it must be in \[0, 1\)"),
        ({"seed": -1}, r"seed is -1; it must be in 0..4294967295"),
        ({"seed": 2**32}, r"seed is 4294967296; it must be in 0..4294967295"),
        ({"cpu_threads": 100_000}, r"cpu_threads is 100000; it must be at most 1024"),  # a segfault in OpenBLAS
    ],
)
def test_settings_out_of_range_are_config_errors_not_crashes(
    make_settings: Callable[..., TrainSettings], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_settings(**overrides))


def test_a_feature_constant_in_training_keeps_unit_scale_on_new_rows() -> None:
    # digits: pixel 24 is 0 in every training image and 1 in some test ones; divided by a floored std of 1e-6 it
    # became 1e6 (the float model got those rows wrong, static INT8's ranges blew up to chance accuracy)
    from kiln.train.models import build_model

    data = bundled_dataset("digits")
    constant = data.x_train.std(axis=0) == 0
    assert constant[24] and data.x_test[:, 24].max() > 0
    standardize = build_model("cnn", x_train=data.x_train, num_outputs=10, task="classification")[0]
    with torch.no_grad():
        z = standardize(torch.from_numpy(data.x_test))
    assert float(z.abs().max()) < 100
    assert torch.equal(standardize.std[torch.from_numpy(constant)], torch.ones(int(constant.sum())))


def test_model_output_that_does_not_fit_the_labels(
    make_settings: Callable[..., TrainSettings], factories_on_path: Path
) -> None:
    settings = make_settings(dataset="digits", model="kiln_train_test_models:three_class_head")
    with pytest.raises(InvalidInput, match=r"returns shape \[4, 3\] .* needs \[4, 10\] \(10 classes\)"):
        train(settings)
    with pytest.raises(InvalidInput, match=r"returned a dict, not a torch nn\.Module"):
        train(make_settings(dataset="digits", model="kiln_train_test_models:not_a_module"))
    # a model for digits' 64 features on iris' 4: torch's shape error was an internal error (exit 1)
    with pytest.raises(InvalidInput, match=r"fails on a batch of 4 rows of 4 float32 features .*must take 4 features"):
        train(make_settings(dataset="iris", model="kiln_train_test_models:three_class_head"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    settings = make_settings(dataset="diabetes", optimizer="sgd", lr=20.0, epochs=5, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"the loss is (nan|inf).*last good checkpoint is .*step-00000002\.pt"):
        train(settings)
    good = Checkpointer(tmp_path / "ckpt").load()
    assert good["step"] == 2
    assert all(v.isfinite().all() for v in good["model"].values())


def test_a_diverged_run_resumes_as_its_message_advises(make_settings: Callable[..., TrainSettings]) -> None:
    """SGD at lr 0.3 runs away from step ~19 and overflows at 23; step 16's checkpoint (loss ~3) is still sound."""
    settings = make_settings(dataset="diabetes", optimizer="sgd", lr=0.3, epochs=3, checkpoint_every=8)
    advice = r"resume from it with a lower lr, or with warmup_steps above 16 .*\(both may change on resume\)"
    with pytest.raises(TrainingDiverged, match=r'last good checkpoint is ".*step-00000016\.pt" \(step 16\); ' + advice):
        train(settings)
    seen: list[StepStats] = []
    resumed = train(dataclasses.replace(settings, lr=0.03, warmup_steps=20, resume="latest"), on_step=seen.append)
    assert (resumed.resumed_from_step, resumed.steps) == (16, 33) and math.isfinite(resumed.metrics["final_loss"])
    assert seen[0].lr == pytest.approx(0.03 * 18 / 20)  # StepStats.lr is the next step's: the warm-up's 18th
    assert seen[-1].lr == pytest.approx(0.03)


def test_a_run_that_diverges_before_any_checkpoint_is_told_to_start_again(
    make_settings: Callable[..., TrainSettings],
) -> None:
    settings = make_settings(dataset="diabetes", optimizer="sgd", lr=0.3, epochs=3, checkpoint_every=0)
    with pytest.raises(TrainingDiverged, match=r"no checkpoint exists; start again with a lower lr or more warmup"):
        train(settings)
    assert train(dataclasses.replace(settings, lr=0.03, warmup_steps=5)).steps == 33  # same checkpoint_dir


def test_config_typo_suggests_the_closest_key(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[train]\ndataset = "iris"\nepocs = 3\n')
    with pytest.raises(ConfigError, match=r'unknown key "epocs" \(did you mean "epochs"\?\)'):
        load_train_settings(config, environ={})


def test_bad_choice_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r'schedule "cosin" is unknown \(did you mean "cosine"\?\)'):
        TrainSettings(schedule="cosin")


def test_precedence_flag_over_environment_over_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[train]\ndataset = "wine"\nepochs = 3\nlr = 0.5\n\n[export]\nexporter = "torchscript"\n')
    settings, export = load_train_settings(config, {"epochs": 9}, environ={"KILN_LR": "0.25"})
    assert (settings.dataset, settings.epochs, settings.lr, export.exporter) == ("wine", 9, 0.25, "torchscript")


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.toml")))
def test_every_shipped_example_resolves(example: str) -> None:
    settings, _ = load_train_settings(EXAMPLES / f"{example}.toml", environ={})
    assert settings.dataset in {"digits", "iris", "wine", "breast_cancer", "diabetes", *PAIR_DATASETS}


@pytest.mark.parametrize("example", ["iris", "wine", "breast_cancer", "diabetes", "digits"])
def test_every_tabular_example_does_at_least_as_well_as_a_linear_model_on_its_held_out_rows(
    example: str, tmp_path: Path
) -> None:
    """`kiln train diabetes` overfit (held-out R² 0.23 against least squares' 0.36) until its example changed."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    settings, _ = load_train_settings(EXAMPLES / f"{example}.toml", environ={})
    settings = dataclasses.replace(settings, track=False, export=False, checkpoint_dir=str(tmp_path / "ckpt"))
    result = train(settings)
    data = bundled_dataset(example, test_fraction=settings.test_fraction, seed=settings.seed)
    if data.task == "regression":
        linear = LinearRegression().fit(data.x_train, data.y_train)
        ours, theirs = result.metrics["test_r2"], linear.score(data.x_test, data.y_test)
    else:
        logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(data.x_train, data.y_train)
        ours, theirs = result.metrics["test_accuracy"], logistic.score(data.x_test, data.y_test)
    assert ours >= theirs - 0.005, f"{example}: {ours:.4f} held out against a linear model's {theirs:.4f}"


def test_cli_config_typo_is_one_line_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[train]\ndataset = "iris"\nbatch_sise = 8\n')
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'unknown key "batch_sise" (did you mean "batch_size"?)' in lines[0]
