"""A run ends in a real Kiln artifact, is tracked in a real MLflow store, and can teach a smaller student.

One teacher is trained per module (digits MLP, exported, tracked in SQLite under a temp dir); the tests read
what that run left behind, then distil a student from the artifact through ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln import artifact as artifacts
from kiln.config import ExportSettings
from kiln.data import eval_set
from kiln.runtime import OrtEngine
from kiln.train import TrainResult, TrainSettings, train
from kiln.train.distill import distillation_loss_sum, teacher_logits

TEACHER_WIDTH, STUDENT_WIDTH = 128, 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-road")


@pytest.fixture(scope="module")
def teacher(workdir: Path) -> TrainResult:
    settings = TrainSettings(
        dataset="digits",
        name="digits-teacher",
        hidden_sizes=(TEACHER_WIDTH,),
        epochs=12,
        lr=3e-3,
        cpu_threads=1,
        checkpoint_dir=str(workdir / "ckpt-teacher"),
        out=str(workdir / "repo"),
        tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        experiment="kiln-tests",
        log_every=5,
    )
    return train(settings, export_settings=ExportSettings(exporter="torchscript"))


def test_the_run_is_a_verified_artifact_with_its_training_recorded(teacher: TrainResult) -> None:
    assert teacher.artifact is not None
    art = artifacts.load(teacher.artifact.path)  # sha256 verified
    manifest = art.manifest
    assert (art.name, art.version, manifest.task) == ("digits-teacher", 1, "classification")
    assert manifest.postprocessing["labels"] == [str(i) for i in range(10)]
    train_record = manifest.provenance["train"]
    assert train_record["settings"]["hidden_sizes"] == [TEACHER_WIDTH]
    assert train_record["steps"] == teacher.steps == 12 * 43
    assert train_record["mlflow_run_id"] == teacher.tracking_run_id
    assert manifest.settings["train"]["dataset"] == "digits" and "export" in manifest.settings
    assert manifest.checks["parity"]["passed"] and manifest.checks["train"]["test_accuracy"] >= 0.9
    # the ONNX graph, run by ONNX Runtime on the held-out set stored with it, scores what training reported
    held_out = eval_set(art)
    assert held_out.feeds is not None and held_out.labels is not None
    logits = OrtEngine(art.model_path).run(held_out.feeds)["logits"]
    accuracy = float((logits.argmax(axis=1) == held_out.labels).mean())
    assert accuracy == pytest.approx(teacher.metrics["test_accuracy"], abs=1.5 / len(held_out.labels))


def test_mlflow_holds_params_step_metrics_config_and_the_artifact(teacher: TrainResult, workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert teacher.artifact is not None and teacher.tracking_run_id is not None
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(teacher.tracking_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["hidden_sizes"] == str([TEACHER_WIDTH]) and run.data.params["dataset"] == "digits"
    assert run.data.tags["kiln.artifact"] == str(teacher.artifact.path)
    assert run.data.metrics["test_accuracy"] == pytest.approx(teacher.metrics["test_accuracy"])
    history = client.get_metric_history(teacher.tracking_run_id, "loss")
    assert len(history) == teacher.steps // 5 + 1  # every log_every steps, plus the last
    assert history[-1].value < history[0].value
    logged = {f.path for f in client.list_artifacts(teacher.tracking_run_id)}
    assert {"train_settings.json", "kiln.json"} <= logged
    settings_file = Path(client.download_artifacts(teacher.tracking_run_id, "train_settings.json", str(workdir)))
    assert json.loads(settings_file.read_text())["lr"] == 3e-3


def test_the_mlflow_run_links_the_artifact_by_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kiln train` writes to ./kiln-repo by default: the tag named "kiln-repo/iris/1", relative to a directory
    the run does not record."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    result = train(TrainSettings(dataset="iris", hidden_sizes=(8,), epochs=1, cpu_threads=1, out="repo"))
    assert result.artifact is not None and result.tracking_run_id is not None
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    tag = client.get_run(result.tracking_run_id).data.tags["kiln.artifact"]
    assert tag == str(tmp_path / "repo" / "iris" / "1")
    assert artifacts.load(tag).sha256 == result.artifact.sha256


def test_distilled_student_from_the_onnx_teacher(teacher: TrainResult, workdir: Path) -> None:
    assert teacher.artifact is not None
    student = train(
        TrainSettings(
            dataset="digits",
            name="digits-student",
            hidden_sizes=(STUDENT_WIDTH,),
            epochs=25,
            lr=1e-2,
            cpu_threads=1,
            teacher=str(teacher.artifact.path),
            distill_temperature=4.0,
            distill_alpha=0.7,
            checkpoint_dir=str(workdir / "ckpt-student"),
            out=str(workdir / "repo"),
            track=False,
        ),
        export_settings=ExportSettings(exporter="torchscript"),
    )
    assert student.artifact is not None
    assert student.metrics["teacher_test_accuracy"] == pytest.approx(teacher.metrics["test_accuracy"])
    assert student.metrics["accuracy_vs_teacher"] >= -0.04  # a 10x smaller hidden layer, within 4 points
    assert student.artifact.manifest.provenance["train"]["teacher"] == str(teacher.artifact.path)
    sizes = [a.manifest.model["size_bytes"] for a in (teacher.artifact, student.artifact)]
    assert sizes[1] * 4 < sizes[0]


def test_teacher_logits_from_a_torch_module() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    logits = teacher_logits(module, x, 3)
    assert torch.allclose(logits, module(torch.from_numpy(x)).detach())


def test_a_scikit_learn_teacher_artifact_gives_log_probabilities(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from kiln.data import bundled_dataset
    from kiln.export import export

    data = bundled_dataset("iris")
    clf = LogisticRegression(max_iter=500).fit(data.x_train, data.y_train)
    art = export(clf, out=tmp_path, name="iris-lr", example_inputs=data.x_test)
    logits = teacher_logits(str(art.path), data.x_test, 3)
    expected = clf.predict_proba(data.x_test)
    np.testing.assert_allclose(torch.softmax(logits, dim=1).numpy(), expected, atol=1e-4)


def test_a_teacher_is_matched_to_the_students_classes_by_name(tmp_path: Path) -> None:
    # only the width was checked: a teacher of classes "-1", "7" taught a student of "0", "1" its class 0 as 1
    from sklearn.linear_model import LogisticRegression

    from kiln.data import bundled_dataset
    from kiln.errors import InvalidInput
    from kiln.export import export

    data = bundled_dataset("iris")
    names = np.array(["setosa", "versicolor", "virginica"])
    clf = LogisticRegression(max_iter=500).fit(data.x_train, names[data.y_train])
    art = export(clf, out=tmp_path, name="iris-lr", example_inputs=data.x_test)
    assert art.manifest.postprocessing["labels"] == ["setosa", "versicolor", "virginica"]
    expected = clf.predict_proba(data.x_test)
    student = ["virginica", "setosa", "versicolor"]  # the same classes in another order: columns follow the student
    logits = teacher_logits(str(art.path), data.x_test, 3, student)
    np.testing.assert_allclose(torch.softmax(logits, dim=1).numpy(), expected[:, [2, 0, 1]], atol=1e-4)
    with pytest.raises(
        InvalidInput,
        match=r"classifies 'setosa', 'versicolor', 'virginica', but the student's data "
        r"holds the classes '0', '1', '2'; the teacher must classify the same classes, by name",
    ):
        teacher_logits(str(art.path), data.x_test, 3, ["0", "1", "2"])


def test_a_teacher_that_takes_other_features_is_refused_with_both_shapes(tmp_path: Path) -> None:
    """An iris teacher (4 features) for a wine student (13 features, also 3 classes), as an artifact and in torch.

    Before, ONNX Runtime's "Got invalid dimensions" and torch's "mat1 and mat2 shapes" came through: the first
    without the teacher's name or a fix, the second as an internal error."""
    from sklearn.linear_model import LogisticRegression

    from kiln.data import bundled_dataset
    from kiln.errors import InvalidInput
    from kiln.export import export

    iris, wine = bundled_dataset("iris"), bundled_dataset("wine")
    clf = LogisticRegression(max_iter=500).fit(iris.x_train, iris.y_train)
    art = export(clf, out=tmp_path, name="iris-lr", example_inputs=iris.x_test)
    with pytest.raises(InvalidInput, match=r'teacher ".*iris-lr.*" takes \S+ FP32 \[-1, 4\], but the student\'s rows '):
        teacher_logits(str(art.path), wine.x_train, 3)
    with pytest.raises(InvalidInput, match=r'teacher "Linear" fails on a batch of 133 rows of 13 float32 features'):
        teacher_logits(torch.nn.Linear(4, 3), wine.x_train, 3)


def test_distillation_loss_limits() -> None:
    torch.manual_seed(0)
    student, other = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    hard_only = distillation_loss_sum(student, other, labels, temperature=3.0, alpha=0.0)
    assert torch.allclose(hard_only, F.cross_entropy(student, labels, reduction="sum"))
    same = distillation_loss_sum(student, student, labels, temperature=3.0, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-5)
    assert float(distillation_loss_sum(student, other, labels, temperature=3.0, alpha=1.0)) > 0.1


def test_a_resumed_run_keeps_logging_into_its_first_mlflow_run(teacher: TrainResult, workdir: Path) -> None:
    """Runs last in this module: it continues the teacher's run for one more epoch (no second export)."""
    from mlflow.tracking import MlflowClient

    resumed = train(
        TrainSettings(
            dataset="digits",
            name="digits-teacher",
            hidden_sizes=(TEACHER_WIDTH,),
            epochs=13,
            lr=3e-3,
            cpu_threads=1,
            checkpoint_dir=str(workdir / "ckpt-teacher"),
            out=str(workdir / "repo"),
            tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
            experiment="kiln-tests",
            log_every=5,
            resume="latest",
            export=False,
        )
    )
    assert resumed.resumed_from_step == teacher.steps and resumed.steps == 13 * 43
    assert resumed.tracking_run_id == teacher.tracking_run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(resumed.tracking_run_id, "loss")]
    assert max(steps) == 13 * 43 and client.get_run(resumed.tracking_run_id).info.status == "FINISHED"


def test_a_store_mlflow_refuses_is_a_config_error_before_any_training(tmp_path: Path) -> None:
    # a plain directory is MLflow 3's file store, which it refuses: "internal error: MlflowException", exit 1
    from kiln.errors import ConfigError

    settings = TrainSettings(
        dataset="iris",
        max_steps=4,
        export=False,
        checkpoint_dir=str(tmp_path / "ck"),
        tracking_uri=str(tmp_path / "runs"),
    )
    with pytest.raises(ConfigError, match=r'MLflow cannot use the tracking store ".*runs" \(The filesystem tracking'):
        train(settings)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
