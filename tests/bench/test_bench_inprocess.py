"""kiln.bench.bench on tiny real models: every engine x batch size timed, fidelity exact where it must be."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.bench import BenchReport, BenchSettings, bench
from kiln.errors import ConfigError, InvalidInput

Array = np.ndarray[Any, Any]


def test_rows_for_every_engine_and_batch_size(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings
) -> None:
    report = bench(mlp_artifacts, settings=fast_settings)
    names = ["mlp v1 (fp32)", "mlp v2 (resaved)", "mlp v3 (perturbed)"]
    assert report.engines == names
    assert sorted((r.engine, r.batch_size) for r in report.rows) == sorted((n, b) for n in names for b in (1, 4))
    for row in report.rows:
        assert row.rows_per_s == pytest.approx(row.batch_size / (row.p50_ms / 1e3))
        assert 0 < row.p50_ms <= row.p99_ms
        assert row.size_bytes == mlp_artifacts[0].model_path.stat().st_size
    assert report.corpus == []  # sentences/s is for text models only
    assert report.task == "classification"
    assert report.settings["batch_sizes"] == [1, 4]
    assert {"onnxruntime", "numpy", "onnx"} <= set(report.versions)
    assert report.hardware["logical_cores"] >= 1


def test_fidelity_is_exact_for_the_same_model_and_not_for_a_perturbed_one(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, heldout: tuple[Array, Array]
) -> None:
    report = bench(mlp_artifacts, settings=fast_settings)
    reference = report.row("mlp v1 (fp32)", 4).fidelity
    same = report.row("mlp v2 (resaved)", 4).fidelity
    perturbed = report.row("mlp v3 (perturbed)", 1).fidelity
    _, labels = heldout
    assert reference["accuracy"] == pytest.approx(1 - len(labels[::4]) / len(labels))  # every 4th label is wrong
    assert same["max_abs_error"] == 0.0
    assert same["accuracy"] == reference["accuracy"]
    assert perturbed["max_abs_error"] > 0.01
    assert report.row("mlp v3 (perturbed)", 4).fidelity == perturbed  # one figure per engine


def test_samples_limits_the_evaluation_set(mlp_artifacts: list[artifacts.Artifact]) -> None:
    settings = BenchSettings(batch_sizes=(2,), warmup_runs=0, runs=1, include_torch=False, samples=8)
    report = bench(mlp_artifacts[:1], settings=settings)
    # accuracy over the first 8 rows: rows 0 and 4 carry a changed label
    assert report.row("mlp v1 (fp32)", 2).fidelity["accuracy"] == pytest.approx(6 / 8)


def test_pytorch_source_runs_beside_the_onnx_engines(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, torch_factory: Any
) -> None:
    report = bench(mlp_artifacts[:2], settings=fast_settings, include_source=True)
    assert report.engines == ["mlp v1 (fp32)", "mlp v2 (resaved)", "pytorch-eager"]
    torch_row = report.row("pytorch-eager", 4)
    n_params = 4 * 8 + 8 + 8 * 3 + 3
    assert torch_row.size_bytes == n_params * 4
    assert torch_row.fidelity["max_abs_error"] < 1e-5
    assert torch_row.fidelity["accuracy"] == report.row("mlp v1 (fp32)", 4).fidelity["accuracy"]
    assert report.settings["include_source"] is True


def test_source_is_skipped_when_it_cannot_be_rebuilt(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # no torch_factory fixture: the factory module does not exist, so only the ONNX engines run
    report = bench(mlp_artifacts[:1], settings=fast_settings, include_source=True)
    assert report.engines == ["mlp v1 (fp32)"]
    assert "cannot rebuild the PyTorch source" in caplog.text


def test_text_models_report_corpus_throughput_and_cosine(
    text_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings
) -> None:
    settings = BenchSettings(batch_sizes=(1, 4), warmup_runs=1, runs=3, include_torch=False, samples=24)
    report = bench(text_artifacts, settings=settings)
    base, noisy = "bow v1 (fp32)", "bow v2 (noisy)"
    assert report.engines == [base, noisy]
    assert [(c.engine, c.texts, c.batch_size) for c in report.corpus] == [(base, 24, 4), (noisy, 24, 4)]
    assert all(c.sentences_per_s > 0 for c in report.corpus)
    assert report.row(base, 1).fidelity["mean_cosine"] == pytest.approx(1.0)
    assert report.row(base, 1).fidelity["top10_overlap"] == 1.0
    assert report.row(noisy, 1).fidelity["mean_cosine"] < 0.999


def test_json_round_trips(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, tmp_path: Path
) -> None:
    report = bench(mlp_artifacts[:2], settings=fast_settings)
    path = report.write_json(tmp_path / "out" / "bench.json")
    assert BenchReport.from_dict(json.loads(path.read_text(encoding="utf-8"))) == report


def test_table_has_the_documented_columns(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings
) -> None:
    from rich.console import Console

    report = bench(mlp_artifacts[:2], settings=fast_settings)
    table = report.table()
    assert [str(c.header) for c in table.columns] == [
        "engine",
        "batch",
        "p50 ms",
        "p99 ms",
        "rows/s",
        "size",
        "fidelity",
    ]
    assert table.row_count == 4
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    assert "mlp v2 (resaved)" in console.export_text()


def test_progress_reaches_one_and_report_dir_gets_the_html(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, tmp_path: Path
) -> None:
    calls: list[tuple[str, float]] = []
    bench(
        mlp_artifacts[:2],
        settings=fast_settings,
        report_dir=tmp_path / "report",
        progress=lambda m, f: calls.append((m, f)),
    )
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any("batch size 4" in m for m, _ in calls)
    assert (tmp_path / "report" / "index.html").is_file()
    assert (tmp_path / "report" / "bench.json").is_file()


def test_no_artifacts_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"no artifacts to benchmark .* pass at least one artifact"):
        bench([])


def test_artifacts_with_different_inputs_are_invalid_input(
    mlp_artifacts: list[artifacts.Artifact], text_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings
) -> None:
    with pytest.raises(
        InvalidInput,
        match=r'model "bow" v1 takes inputs \[input_ids INT64, attention_mask INT64\]'
        r".*share one input signature; pass versions of one model",
    ):
        bench([mlp_artifacts[0], text_artifacts[0]], settings=fast_settings)


def test_settings_outside_their_rules_are_config_errors(mlp_artifacts: list[artifacts.Artifact]) -> None:
    with pytest.raises(ConfigError, match='"batch_sizes" is \\[\\]; it must be at least one batch size'):
        bench(mlp_artifacts[:1], settings=BenchSettings(batch_sizes=()))
    with pytest.raises(ConfigError, match='"runs" is 0'):
        bench(mlp_artifacts[:1], settings=BenchSettings(runs=0))


def test_bad_settings_name_a_kiln_bench_flag_that_exists(mlp_artifacts: list[artifacts.Artifact]) -> None:
    import typer

    from kiln.cli import app

    command = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    options = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    for bad in (BenchSettings(warmup_runs=-1), BenchSettings(runs=0), BenchSettings(samples=0)):
        with pytest.raises(ConfigError, match=r"fix --[\w-]+ or KILN_") as info:
            bench(mlp_artifacts[:1], settings=bad)
        flag = info.value.message.split("fix ")[-1].split(" ")[0]
        assert flag in options, info.value.message
    with pytest.raises(ConfigError, match=r'"warmup_runs" is -1; .* fix --warmup or KILN_WARMUP_RUNS'):
        bench(mlp_artifacts[:1], settings=BenchSettings(warmup_runs=-1))


def fixed_batch_artifact(base: artifacts.Artifact, tmp_path: Path, batch: int) -> artifacts.Artifact:
    """``base``'s model and held-out data, exported with a fixed batch axis of ``batch`` rows."""
    import onnx

    from kiln.types import Signature, TensorSpec

    model = onnx.load(str(base.model_path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    signature = Signature(
        inputs=tuple(TensorSpec(s.name, s.dtype, (batch, *s.shape[1:])) for s in base.manifest.signature.inputs),
        outputs=tuple(TensorSpec(s.name, s.dtype, (batch, *s.shape[1:])) for s in base.manifest.signature.outputs),
    )
    manifest = artifacts.Manifest(
        name="fixed", signature=signature, task=base.manifest.task, eval_data=base.manifest.eval_data
    )
    assets: dict[str, Path | bytes] = {p.name: p for p in base.assets_dir.iterdir()}
    return artifacts.write(tmp_path / "fixed-repo", manifest, path, assets=assets)


def test_a_fixed_batch_axis_refuses_other_batch_sizes_before_any_timing(
    mlp_artifacts: list[artifacts.Artifact], tmp_path: Path
) -> None:
    fixed = fixed_batch_artifact(mlp_artifacts[0], tmp_path, batch=1)
    calls: list[str] = []
    settings = BenchSettings(batch_sizes=(1, 4), warmup_runs=0, runs=1, include_torch=False, samples=8)
    # was ONNX Runtime's multi-line "Got invalid dimensions for input" with a hint about token ids, mid-run
    with pytest.raises(
        ConfigError,
        match=r'model "fixed" v1 takes a fixed batch of 1 row\(s\) \(input "input" has shape \[1, 4\]\), so it '
        r"cannot run batch size\(s\) \[4\]; pass --batch-sizes 1",
    ):
        bench([fixed], settings=settings, progress=lambda m, f: calls.append(m))
    assert calls == []
    report = bench([fixed], settings=dataclasses.replace(settings, batch_sizes=(1,)))
    assert report.batch_sizes == [1]


@pytest.mark.parametrize("inside", [False, True])
def test_a_report_dir_that_cannot_be_a_directory_is_refused_before_the_run(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, tmp_path: Path, inside: bool
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory", encoding="utf-8")
    report_dir = a_file / "report" if inside else a_file
    calls: list[str] = []
    # was FileExistsError / NotADirectoryError (an "internal error") after the whole benchmark had run
    with pytest.raises(
        ConfigError,
        match=r'report directory ".*a-file.*" (is a file|is inside ".*a-file", which is a file); pass --report-dir',
    ):
        bench(mlp_artifacts[:1], settings=fast_settings, report_dir=report_dir, progress=lambda m, f: calls.append(m))
    assert calls == []


def test_a_model_without_held_out_data_is_benched_on_data_passed_to_it(
    mlp_artifacts: list[artifacts.Artifact], fast_settings: BenchSettings, tmp_path: Path
) -> None:
    # a model exported with --model has none, and kiln bench had no way to take some: `kiln optimize --eval-data`
    # printed "next: kiln bench", which refused it
    from kiln.data import EvalSet, eval_set

    base = mlp_artifacts[0]
    bare = artifacts.write(tmp_path / "repo", dataclasses.replace(base.manifest, eval_data={}), base.model_path)
    with pytest.raises(InvalidInput, match=r"has no held-out data, .*`kiln bench \.\.\. --eval-data FILE.npz`"):
        bench([bare], settings=fast_settings)
    held_out = eval_set(base)
    report = bench([bare], settings=fast_settings, eval_data=held_out)
    assert {row.fidelity["accuracy"] for row in report.rows} == {
        bench([base], settings=fast_settings).rows[0].fidelity["accuracy"]
    }
    (name,) = base.manifest.signature.input_names
    wrong = EvalSet(feeds={name: np.zeros((4, 3), dtype=np.float32)})
    with pytest.raises(InvalidInput, match=rf'held-out input "{name}" has shape \[4, 3\]'):
        bench([bare], settings=fast_settings, eval_data=wrong)
    # as export_model takes it: (x, y), float64 rows included; it was "'tuple' object has no attribute 'feeds'"
    assert held_out.feeds is not None
    as_tuple = (held_out.feeds[name].astype(np.float64), held_out.labels)
    assert bench(bare.path, settings=fast_settings, eval_data=as_tuple).rows[0].fidelity == report.rows[0].fidelity
    with pytest.raises(InvalidInput, match=r"eval_data is a ndarray; pass \(x, y\)"):
        bench([bare], settings=fast_settings, eval_data=held_out.feeds[name])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"settings is a dict, not BenchSettings; pass BenchSettings\(\.\.\.\)"):
        bench([bare], settings={"runs": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize("classes", ["1..3", "strings"])
def test_a_classifier_whose_classes_are_not_0_to_k_minus_1_is_scored_on_its_own_labels(
    tmp_path: Path, fast_settings: BenchSettings, classes: str
) -> None:
    # wine's classes 1, 2, 3 scored accuracy 0.0 (an argmax over probabilities gives 0..2) and string classes were
    # refused with "store the labels as class ids 0..K-1", though scikit-learn's own label output gives them
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kiln import export_model
    from kiln.data import bundled_dataset

    data = bundled_dataset("wine")
    names = np.array(data.target_names)
    y_train, y_test = (
        (data.y_train + 1, data.y_test + 1) if classes == "1..3" else (names[data.y_train], names[data.y_test])
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(data.x_train, y_train)
    art = export_model(
        model, out=tmp_path / "repo", name="wine", example_inputs=data.x_test, eval_data=(data.x_test, y_test)
    )

    report = bench([art], settings=dataclasses.replace(fast_settings, samples=len(y_test)))
    expected = float(np.mean(model.predict(data.x_test) == y_test))
    assert expected > 0.9
    assert report.row("wine v1 (fp32)", 4).fidelity["accuracy"] == pytest.approx(expected)
