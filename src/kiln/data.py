"""Real data that ships with the installed packages: no download, ever.

- English text: the paragraphs of Python's own ``pydoc_data.topics`` (the help() topics), in their natural order
  and natural lengths.
- Tabular: the datasets scikit-learn bundles (``load_digits`` etc.; never the ``fetch_*`` functions, which download).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ConfigError, InvalidInput, did_you_mean

_MIN_PARAGRAPH_CHARS = 20


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    found: list[str] = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= _MIN_PARAGRAPH_CHARS:
                found.append(text)
    return tuple(found)


def topic_paragraphs(groups: dict[str, tuple[str, ...]], *, min_chars: int = 40) -> list[tuple[str, str]]:
    """``(paragraph, group)`` for the paragraphs of each group's help topics: real text labelled by its subject.

    Example:
        >>> rows = topic_paragraphs({"errors": ("try", "raise"), "strings": ("strings",)})  # doctest: +SKIP
    """
    from pydoc_data.topics import topics

    unknown = [key for keys in groups.values() for key in keys if key not in topics]
    if unknown:
        raise InvalidInput(
            f'"{unknown[0]}" is not a help topic{did_you_mean(unknown[0], sorted(topics))}; name keys of '
            "pydoc_data.topics.topics (what help() lists under TOPICS and keywords)"
        )
    return [
        (text, label)
        for label, keys in groups.items()
        for key in keys
        for block in topics[key].split("\n\n")
        if len(text := " ".join(block.split())) >= min_chars
    ]


def english_corpus(limit: int | None = None, *, offset: int = 0) -> list[str]:
    """Paragraphs of real English text (Python's help topics), natural order, lengths from 20 chars upward.

    ``offset`` selects a disjoint slice, so calibration and evaluation can use different texts.
    """
    paragraphs = _paragraphs()
    end = len(paragraphs) if limit is None else offset + limit
    return list(paragraphs[offset:end])


@dataclass(frozen=True)
class TabularData:
    """A bundled dataset split into train and held-out parts."""

    name: str
    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]
    task: str  # "classification" | "regression"
    target_names: tuple[str, ...]


_BUNDLED = {
    "digits": ("load_digits", "classification"),
    "breast_cancer": ("load_breast_cancer", "classification"),
    "wine": ("load_wine", "classification"),
    "iris": ("load_iris", "classification"),
    "diabetes": ("load_diabetes", "regression"),
}


def split_rows(
    rows: int, test_fraction: float, seed: int, stratify: np.ndarray[Any, Any] | None = None, *, least: int = 1
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Train and held-out row indices: scikit-learn's ``train_test_split`` of ``range(rows)``, stratified by the
    class ids ``stratify``, with at least ``least`` rows on each side (and a row of each class on each side).

    Raises:
        ConfigError: ``test_fraction`` leaves a side too small; scikit-learn's own errors came through as crashes.
    """
    from sklearn.model_selection import train_test_split

    held_out = int(np.ceil(test_fraction * rows))  # as train_test_split rounds a fraction
    classes = 0 if stratify is None else len(np.unique(stratify))
    if min(held_out, rows - held_out) < max(least, classes):
        need = f"at least {least} row{'s' if least > 1 else ''} on each side" + (
            f" and one of each of the {classes} classes on each side" if classes else ""
        )
        raise ConfigError(
            f"test_fraction {test_fraction:g} of {rows} rows holds out {held_out} and trains on {rows - held_out}; "
            f"the split needs {need}: change test_fraction (e.g. 0.25) or add rows",
            setting="test_fraction",
            value=test_fraction,
        )
    train, test = train_test_split(np.arange(rows), test_size=test_fraction, random_state=seed, stratify=stratify)
    return train, test


def bundled_dataset(name: str, *, test_fraction: float = 0.25, seed: int = 0) -> TabularData:
    """Load a dataset that scikit-learn ships, as float32 features, with a stratified held-out split."""
    import sklearn.datasets

    if name not in _BUNDLED:
        raise InvalidInput(
            f'dataset "{name}" is not bundled{did_you_mean(name, _BUNDLED)}; choose one of {", ".join(_BUNDLED)}',
            dataset=name,
        )
    loader, task = _BUNDLED[name]
    bunch = getattr(sklearn.datasets, loader)()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target)
    y = y.astype(np.int64) if task == "classification" else y.astype(np.float32)
    train, test = split_rows(len(x), test_fraction, seed, y if task == "classification" else None)
    x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    names = tuple(str(n) for n in getattr(bunch, "target_names", ())) if task == "classification" else ()
    return TabularData(name, x_train, y_train, x_test, y_test, task, names)


# --- held-out data recorded with an artifact -------------------------------------------------------------------

HELDOUT_FILE = "heldout.npz"
LABELS_KEY = "__labels__"
TEXTS_KEY = "__texts__"  # held-out texts of a text model trained on a dataset of its own
TEXT_EVAL_OFFSET = 1000  # evaluation texts start here; calibration texts are taken before it
CALIBRATION_TEXTS = 128  # calibration uses the texts just before TEXT_EVAL_OFFSET


@dataclass(frozen=True)
class EvalSet:
    """Held-out inputs for an artifact: texts (text models) or tensor feeds, with labels when known."""

    texts: list[str] | None = None
    feeds: dict[str, np.ndarray[Any, Any]] | None = None
    labels: np.ndarray[Any, Any] | None = None

    @property
    def rows(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        assert self.feeds is not None
        return len(next(iter(self.feeds.values())))

    def take(self, index: np.ndarray[Any, Any] | slice) -> EvalSet:
        """The subset of rows at ``index``."""
        texts = None if self.texts is None else list(np.asarray(self.texts, dtype=object)[index])
        feeds = None if self.feeds is None else {k: v[index] for k, v in self.feeds.items()}
        labels = None if self.labels is None else self.labels[index]
        return EvalSet(texts=texts, feeds=feeds, labels=labels)


def heldout_asset(feeds: dict[str, np.ndarray[Any, Any]], labels: np.ndarray[Any, Any] | None) -> bytes:
    """Serialise held-out feeds (and labels) for ``assets/heldout.npz``."""
    import io

    arrays = dict(feeds)
    if labels is not None:  # class names in an object array (a pandas column's) would need pickle to load
        arrays[LABELS_KEY] = labels.astype(str) if labels.dtype.kind == "O" else labels
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def heldout_texts_asset(texts: Sequence[str], labels: np.ndarray[Any, Any] | None) -> bytes:
    """Serialise held-out texts (and labels) for ``assets/heldout.npz``; a str array, readable without pickle."""
    return heldout_asset({TEXTS_KEY: np.asarray(list(texts), dtype=str)}, labels)


def read_npz(path: Path, what: str, error: type[InvalidInput] = InvalidInput) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays of an ``.npz`` a user passed (``what``: "calibration file", say), by name; ``error`` when the file
    is missing or unreadable (pickled objects are refused)."""
    import zipfile

    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise error(f'{what} "{path}" {state}; pass an .npz of model inputs', path=str(path))
    try:
        # NOTE: opened here, not by np.load, which leaves its file open when zipfile refuses a truncated .npz
        with path.open("rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy: one unnamed array
                raise error(
                    f'{what} "{path}" is an .npy file (one unnamed array), not an .npz of arrays named like the model '
                    "inputs; save one with np.savez(path, input=rows)",
                    path=str(path),
                )
            with loaded as data:
                return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # empty, truncated, not numpy at all
        raise error(f'{what} "{path}" is not a readable .npz ({exc})', path=str(path)) from exc


def load_eval_npz(path: Path | str, input_names: list[str]) -> EvalSet:
    """Held-out data from an ``.npz``: one array per model input, named like it, and ``labels`` (optional)."""
    path = Path(path)  # a str was an AttributeError
    arrays = read_npz(path, "held-out data file")
    labels = arrays.pop("labels", arrays.pop(LABELS_KEY, None))
    return _checked_eval_set(arrays, labels, input_names, f'held-out data file "{path}"')


def as_eval_set(value: Any, inputs: Sequence[Any]) -> EvalSet:
    """Held-out data given in Python as ``export_model`` takes it, for a model of these input specs: an
    :class:`EvalSet`, ``(x, y)`` or ``(x,)``, where ``x`` is an array (a model with one input) or a dict of arrays
    named after the inputs, and ``y`` the labels or None. Floating arrays take the input's float type (float64
    rows for a float32 model, say). ``optimize_model(art, eval_data=(x, y))`` was an AttributeError ("'tuple'
    object has no attribute 'feeds'").
    """
    if isinstance(value, EvalSet):
        return value
    names = [spec.name for spec in inputs]
    if not isinstance(value, tuple | list) or len(value) not in (1, 2):
        raise InvalidInput(
            f"eval_data is a {type(value).__name__}; pass (x, y): x an array (or a dict of arrays, one per input "
            f"of {', '.join(names)}), y the labels or None; or kiln.data.load_eval_npz(path, input_names)"
        )
    x, labels = value[0], (value[1] if len(value) == 2 else None)
    if isinstance(x, dict):
        arrays = {str(k): np.asarray(v) for k, v in x.items()}
    elif len(names) == 1:
        arrays = {names[0]: np.asarray(x)}
    else:
        raise InvalidInput(
            f"eval_data's x is one array, but the model takes {len(names)} inputs ({', '.join(names)}); pass a dict "
            "of arrays named after them"
        )
    for spec in inputs:
        array = arrays.get(spec.name)
        if array is not None and array.dtype.kind == "f" and np.dtype(spec.numpy_dtype).kind == "f":
            arrays[spec.name] = array.astype(spec.numpy_dtype, copy=False)
    return _checked_eval_set(arrays, None if labels is None else np.asarray(labels), names, "eval_data")


def _checked_eval_set(
    arrays: dict[str, np.ndarray[Any, Any]], labels: np.ndarray[Any, Any] | None, input_names: list[str], what: str
) -> EvalSet:
    """Held-out arrays that name the model's inputs, hold rows, agree on their row count and are finite."""
    if sorted(arrays) != sorted(input_names):
        raise InvalidInput(
            f"{what} has arrays {', '.join(sorted(arrays)) or 'none'}; the model takes "
            f'{", ".join(input_names)}: name one array after each input (and, optionally, one "labels")',
        )
    scalars = sorted(k for k, v in arrays.items() if v.ndim == 0) + (
        ["labels"] if labels is not None and labels.ndim == 0 else []
    )
    if scalars:
        raise InvalidInput(f'{what} holds a scalar "{scalars[0]}"; each array holds rows (first axis = rows)')
    rows = {len(v) for v in arrays.values()} | ({len(labels)} if labels is not None else set())
    if len(rows) != 1 or 0 in rows:
        raise InvalidInput(
            f"{what} has arrays of {sorted(rows)} rows; every array (and labels) needs the same number of rows, at "
            "least one"
        )
    unfinite = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all())
    if unfinite:  # the guard would score NaN and blame the accuracy budget
        raise InvalidInput(
            f'{what}, array "{unfinite[0]}" holds NaN or infinite values; hold out real, finite rows (drop or fill '
            "those)"
        )
    return EvalSet(feeds=arrays, labels=labels)


def first_misfit(inputs: Sequence[Any], shapes: dict[str, tuple[int, ...]]) -> tuple[Any, tuple[int, ...]] | None:
    """The first input spec whose held-out array (by name in ``shapes``) does not fit it, with that shape."""
    return next(
        ((spec, shapes[spec.name]) for spec in inputs if spec.name in shapes and not spec.fits(shapes[spec.name])),
        None,
    )


def check_eval_fits(artifact: Any, data: EvalSet) -> None:
    """A caller's held-out feeds must fit the model's inputs (ORT's own refusal comes mid-run, on 3 lines).

    Raises:
        InvalidInput: naming the input and both shapes.
    """
    misfit = first_misfit(artifact.manifest.signature.inputs, {k: v.shape for k, v in (data.feeds or {}).items()})
    if misfit is not None:
        spec, shape = misfit
        raise InvalidInput(
            f'held-out input "{spec.name}" has shape {list(shape)}; model "{artifact.name}" takes '
            f"{list(spec.shape)} (-1 = any size); pass held-out rows of that shape",
            input=spec.name,
            expected=list(spec.shape),
            actual=list(shape),
        )


def eval_set(artifact: Any, limit: int | None = None) -> EvalSet:
    """The held-out data an artifact's manifest points to (``eval_data``); InvalidInput if it has none.

    Text models use the English corpus from ``TEXT_EVAL_OFFSET`` on (never the calibration texts), or, trained
    on a dataset of their own (``kind = "text"``), its held-out texts and labels in ``assets/heldout.npz``;
    tabular models use ``assets/heldout.npz`` written at export.
    """
    spec = artifact.manifest.eval_data
    kind = spec.get("kind")
    if kind == "text_corpus":
        return EvalSet(texts=english_corpus(limit or 512, offset=int(spec.get("offset", TEXT_EVAL_OFFSET))))
    if kind in ("tabular", "text"):
        with np.load(artifact.assets_dir / spec.get("file", HELDOUT_FILE), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        labels = arrays.pop(LABELS_KEY, None)
        eval_data = (
            EvalSet(texts=[str(t) for t in arrays[TEXTS_KEY]], labels=labels)
            if kind == "text"
            else EvalSet(feeds=arrays, labels=labels)
        )
        return eval_data.take(slice(0, limit)) if limit is not None else eval_data
    raise InvalidInput(
        f'model "{artifact.name}" v{artifact.version} has no held-out data (eval_data: {spec or "none"}); '
        "pass some with `kiln optimize --eval-data FILE.npz`, or export with held-out data (`kiln export ... "
        "--dataset NAME`, or `kiln.export_model(model, eval_data=(x, y), ...)` from Python)",
        model=artifact.name,
    )
