"""Training data: a scikit-learn bundled dataset, a CSV or a Parquet file, as float32 features and checked targets."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data import bundled_dataset, split_rows
from kiln.errors import InvalidInput, did_you_mean

Array = np.ndarray[Any, Any]
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
PARQUET_SUFFIXES = (".parquet", ".pq")
PYARROW_INSTALL_HINT = 'pip install "pyarrow>=14"'
_MAX_AUTO_CLASSES = 50  # an integer target with more distinct values than this is treated as regression


@dataclass(frozen=True)
class TrainData:
    """Features ``[N, F]`` float32 and targets (int64 class ids, or float32 values) split into train and test."""

    name: str
    task: str  # "classification" | "regression"
    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    feature_names: tuple[str, ...]
    labels: tuple[str, ...]  # class names, in class-id order (empty for regression)

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_outputs(self) -> int:
        """Width of the model's output: one logit per class, or 1 for regression."""
        return len(self.labels) if self.task == "classification" else 1


def load_train_data(
    dataset: str,
    *,
    task: str = "auto",
    target: str = "",
    features: tuple[str, ...] = (),
    test_fraction: float = 0.25,
    seed: int = 0,
) -> TrainData:
    """Load ``dataset`` (a bundled name or a ``.csv`` path) and split it; clear errors for bad input.

    Example:
        >>> data = load_train_data("iris")
        >>> data.task, data.num_features, data.num_outputs
        ('classification', 4, 3)
    """
    if dataset.lower().endswith(TABLE_SUFFIXES):
        path = Path(dataset)
        header, body = _read_parquet(path) if path.suffix.lower() in PARQUET_SUFFIXES else _read_csv(path)
        data = _from_rows(path, header, body, task, target, features, test_fraction, seed)
    else:
        if target or features:
            raise InvalidInput(
                f'target/features select columns of a CSV file, but dataset "{dataset}" is a bundled dataset; '
                "remove them or point dataset at a .csv file",
                dataset=dataset,
            )
        bundled = bundled_dataset(dataset, test_fraction=test_fraction, seed=seed)
        if task not in ("auto", bundled.task):
            raise InvalidInput(
                f'dataset "{dataset}" is a {bundled.task} dataset, but task is "{task}"; set task = "{bundled.task}"',
                dataset=dataset,
            )
        width = bundled.x_train.shape[1]
        labels = bundled.target_names
        if bundled.task == "classification" and not labels:
            labels = tuple(str(c) for c in np.unique(bundled.y_train))
        data = TrainData(
            dataset,
            bundled.task,
            bundled.x_train,
            bundled.y_train,
            bundled.x_test,
            bundled.y_test,
            tuple(f"f{i}" for i in range(width)),
            labels,
        )
    _check_finite(data)
    return data


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a CSV file, every cell as text."""
    _check_exists(path)
    rows = list(csv.reader(io.StringIO(read_utf8(path), newline="")))
    return ([h.strip() for h in rows[0]] if rows else []), rows[1:]


def read_utf8(path: Path) -> str:
    """The text of ``path``; a byte-order mark (a spreadsheet's "CSV UTF-8") is dropped, other encodings refused.

    Without the ``-sig`` the mark would stick to the first column's name (or key), which then matches nothing.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            f'"{path}" line {line} holds byte {data[exc.start]:#04x}, which is not UTF-8; save the file as UTF-8 '
            "(e.g. iconv -f latin1 -t utf-8)",
            path=str(path),
            line=line,
        ) from exc


def _read_parquet(path: Path) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a Parquet file, every cell as text (so CSV and Parquet go through the same checks).

    ``repr`` of a float round-trips exactly, so no precision is lost on the way to float32; a null is ``""``.
    """
    _check_exists(path)
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InvalidInput(f'"{path}" is a Parquet file, which needs pyarrow; {PYARROW_INSTALL_HINT}') from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for a file it cannot read
        raise InvalidInput(f'"{path}" cannot be read as Parquet ({exc}); check the file', path=str(path)) from exc
    columns = [["" if v is None else str(v) for v in column.to_pylist()] for column in table.columns]
    return [str(name) for name in table.column_names], [list(row) for row in zip(*columns, strict=True)]


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise InvalidInput(
            f'dataset file "{path}" does not exist; pass an existing {"/".join(TABLE_SUFFIXES)} file', path=str(path)
        )


def _from_rows(
    path: Path,
    header: list[str],
    body: list[list[str]],
    task: str,
    target: str,
    features: tuple[str, ...],
    test_fraction: float,
    seed: int,
) -> TrainData:
    if len(body) < 2:
        raise InvalidInput(f'"{path}" has {len(body)} data rows; training needs at least 2', path=str(path))
    if not target:
        raise InvalidInput(
            f'"{path}" is a table file, so the target column must be named; set target = "<column>" (columns: '
            f"{', '.join(header)})",
            path=str(path),
        )
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:  # the second column of a name was never read: the first was trained on twice
        raise InvalidInput(
            f'"{path}" has more than one column named {", ".join(map(repr, repeated))}; give each column its own name',
            path=str(path),
            columns=repeated,
        )
    if len(set(features)) < len(features):
        twice = sorted({f for f in features if features.count(f) > 1})
        raise InvalidInput(f"features name {', '.join(map(repr, twice))} more than once; name each column once")
    for column in (target, *features):
        if column not in header:
            raise InvalidInput(
                f'column "{column}" is not in "{path}"{did_you_mean(column, header)}; its columns are '
                f"{', '.join(header)}",
                column=column,
            )
    chosen = list(features) or [h for h in header if h != target]
    if target in chosen:
        raise InvalidInput(f'column "{target}" is both the target and a feature; remove it from features')
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InvalidInput(
                f'"{path}" line {number} has {len(row)} fields but the header has {len(header)}; fix the row',
                path=str(path),
                line=number,
            )
    columns = [header.index(c) for c in chosen]
    x = np.empty((len(body), len(chosen)), dtype=np.float32)
    for number, row in enumerate(body, start=2):
        for j, col in enumerate(columns):
            try:
                x[number - 2, j] = float(row[col])
            except ValueError as exc:
                raise InvalidInput(
                    f'"{path}" line {number}, column "{chosen[j]}" holds {row[col]!r}, not a number; features must '
                    "be numeric (encode categories as numbers, or leave the column out of features)",
                    path=str(path),
                    line=number,
                    column=chosen[j],
                ) from exc
    raw_target = [row[header.index(target)].strip() for row in body]
    missing = [number for number, value in enumerate(raw_target, start=2) if not value]
    if missing:
        # NOTE: an empty cell is not a class of its own: read as one, it turned a regression target into
        # hundreds of text classes (task "auto") or added a class "" that no real row has
        raise InvalidInput(
            f'"{path}" line {missing[0]} has no value in target column "{target}" ({len(missing)} such '
            f"row{'s' if len(missing) > 1 else ''}); every row needs a target: fill it in or drop those rows",
            path=str(path),
            line=missing[0],
            column=target,
        )
    task, y, labels = _targets(raw_target, task, path, target)
    if task == "classification" and len(labels) < 2:
        raise InvalidInput(
            f'target column "{target}" of "{path}" holds one class only ({labels[0]!r}); a classifier needs at '
            "least 2 (it would learn to answer that class always); check the target column, or the rows kept",
            path=str(path),
            column=target,
        )
    stratify = y if task == "classification" and np.bincount(y).min() >= 2 else None
    train, test = split_rows(len(x), test_fraction, seed, stratify)
    x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    return TrainData(path.stem, task, x_train, y_train, x_test, y_test, tuple(chosen), labels)


def _targets(raw: list[str], task: str, path: Path, target: str) -> tuple[str, Array, tuple[str, ...]]:
    numeric: list[float] | None
    try:
        numeric = [float(v) for v in raw]
    except ValueError:
        numeric = None
    if task == "regression":
        if numeric is None:
            bad = next(v for v in raw if not _is_float(v))
            raise InvalidInput(
                f'target column "{target}" of "{path}" holds {bad!r}; regression needs numeric targets; '
                'use task = "classification" for class names',
                column=target,
            )
        return task, np.asarray(numeric, dtype=np.float32), ()
    integral = numeric is not None and all(float(v).is_integer() for v in numeric)
    if task == "auto":
        distinct = len(set(raw))
        task = "classification" if numeric is None or (integral and distinct <= _MAX_AUTO_CLASSES) else "regression"
        if task == "regression":
            return task, np.asarray(numeric, dtype=np.float32), ()
    if numeric is not None and integral:
        classes = sorted({int(v) for v in numeric})
        names = tuple(str(c) for c in classes)
        index = {c: i for i, c in enumerate(classes)}
        return task, np.asarray([index[int(v)] for v in numeric], dtype=np.int64), names
    names = tuple(sorted(set(raw)))
    index_s = {c: i for i, c in enumerate(names)}
    return task, np.asarray([index_s[v] for v in raw], dtype=np.int64), names


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_finite(data: TrainData) -> None:
    for split, x in (("train", data.x_train), ("test", data.x_test)):
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            row, col = (int(v) for v in bad[0])
            raise InvalidInput(
                f'dataset "{data.name}" ({split} split) has a non-finite value ({x[row, col]}) in feature '
                f'"{data.feature_names[col]}" ({len(bad)} such values); clean or drop those rows',
                dataset=data.name,
                feature=data.feature_names[col],
            )
    if data.task == "regression" and not np.isfinite(data.y_train).all():
        raise InvalidInput(f'dataset "{data.name}" has non-finite regression targets; clean or drop those rows')
