"""Parquet data files train like CSV ones: the same columns, the same checks, the same split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kiln.data import bundled_dataset
from kiln.errors import InvalidInput
from kiln.train import TrainSettings, train
from kiln.train.data import load_train_data

pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow")


@pytest.fixture
def wine_tables(tmp_path: Path) -> tuple[Path, Path]:
    """Bundled wine data as Parquet (float64 features, string labels) and as the same CSV."""
    import pyarrow as pa

    data = bundled_dataset("wine", test_fraction=0.5)
    x = np.concatenate([data.x_train, data.x_test]).astype(np.float64)
    y = np.concatenate([data.y_train, data.y_test])
    names = np.array(["barolo", "grignolino", "barbera"])[y]
    columns = {f"chem_{i}": x[:, i] for i in range(x.shape[1])} | {"cultivar": names}
    parquet = tmp_path / "wine.parquet"
    pq.write_table(pa.table(columns), parquet)
    csv = tmp_path / "wine.csv"
    lines = [",".join(columns)] + [
        ",".join([*(repr(float(v)) for v in row), label]) for row, label in zip(x, names, strict=True)
    ]
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return parquet, csv


def test_parquet_loads_exactly_like_the_same_csv(wine_tables: tuple[Path, Path]) -> None:
    parquet, csv = wine_tables
    a = load_train_data(str(parquet), target="cultivar", features=("chem_0", "chem_3", "chem_12"))
    b = load_train_data(str(csv), target="cultivar", features=("chem_0", "chem_3", "chem_12"))
    assert a.task == b.task == "classification" and a.labels == b.labels == ("barbera", "barolo", "grignolino")
    assert a.x_train.dtype == np.float32 and a.x_train.shape == (133, 3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_parquet_trains_and_refuses_unknown_columns(
    make_settings: Callable[..., TrainSettings], wine_tables: tuple[Path, Path]
) -> None:
    parquet, _ = wine_tables
    result = train(make_settings(dataset=str(parquet), target="cultivar", epochs=20, lr=1e-2))
    assert result.metrics["test_accuracy"] >= 0.85
    with pytest.raises(InvalidInput, match=r'column "cultivr" is not in .*\(did you mean "cultivar"\?\)'):
        train(make_settings(dataset=str(parquet), target="cultivr"))


def test_a_file_that_is_not_parquet_is_refused(make_settings: Callable[..., TrainSettings], tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"cannot be read as Parquet .*; check the file"):
        train(make_settings(dataset=str(path), target="b"))


def test_a_null_target_is_refused_not_made_a_class(make_settings: Callable[..., TrainSettings], tmp_path: Path) -> None:
    import pyarrow as pa

    data = bundled_dataset("iris", test_fraction=0.5)
    target: list[float | None] = [float(v) for v in data.y_train]
    target[4] = None
    path = tmp_path / "iris.parquet"
    pq.write_table(pa.table({f"f{i}": data.x_train[:, i] for i in range(4)} | {"species": target}), path)
    with pytest.raises(InvalidInput, match=r'line 6 has no value in target column "species" \(1 such row\)'):
        train(make_settings(dataset=str(path), target="species"))
