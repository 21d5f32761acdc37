"""scikit-learn estimators and pipelines -> ONNX through skl2onnx."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ExportError, InvalidInput
from kiln.fidelity import unseen_labels
from kiln.types import Feeds

INPUT_NAME = "input"


def is_sklearn(model: Any) -> bool:
    try:
        from sklearn.base import BaseEstimator
    except ImportError:  # pragma: no cover - a core dependency
        return False
    return isinstance(model, BaseEstimator)


def load_pickle(path: Path, *, trust_pickle: bool) -> Any:
    """Load a pickled/joblib estimator, but only when the user says they trust the file."""
    if not trust_pickle:
        raise InvalidInput(
            f'"{path}" is a pickle; unpickling runs arbitrary code, so Kiln loads it only with --trust-pickle '
            "(trust_pickle=True); pass that flag if you made this file yourself",
            path=str(path),
        )
    import joblib

    return joblib.load(path)


def final_estimator(model: Any) -> Any:
    return model.steps[-1][1] if hasattr(model, "steps") else model


def task_of(model: Any) -> str:
    # NOTE: not hasattr(predict_proba): LinearSVC, SVC(), RidgeClassifier and Perceptron classify without it.
    from sklearn.base import is_classifier

    return "classification" if is_classifier(final_estimator(model)) else "regression"


def class_values(model: Any) -> list[Any] | None:
    """A classifier's ``classes_`` as JSON values (what its ``label`` output gives), or None."""
    classes = getattr(final_estimator(model), "classes_", None)
    if task_of(model) != "classification" or classes is None or np.ndim(classes) != 1:
        return None
    return [str(v) if isinstance(v, np.str_) else v for v in np.asarray(classes).tolist()]


def class_names(model: Any, labels: Sequence[str] | None, heldout: np.ndarray[Any, Any] | None) -> list[str] | None:
    """The names of a classifier's classes in the order of its ``probabilities`` columns, or None.

    The columns follow ``classes_``. ``labels`` (a bundled dataset's target names, say) name class ids: a model
    fitted on ids 0..K-1, or a subset of them, gets ``labels[id]`` for each. A model fitted on class names
    (strings) names its classes itself. Without ``labels``, classes other than 0..K-1 are named by their values.

    Raises:
        InvalidInput: ``labels`` for a model whose classes they do not name, or held-out labels the model never
            predicts (its accuracy on them would read 0, and the accuracy guard would pass any variant).
    """
    values = class_values(model)
    if values is None:
        return list(labels) if labels else None
    shown = ", ".join(map(repr, values[:6])) + (" ..." if len(values) > 6 else "")
    if heldout is not None:
        unseen = unseen_labels(heldout, values)
        if unseen:
            raise InvalidInput(
                f"the held-out labels hold {', '.join(map(repr, unseen[:3]))}{' ...' if len(unseen) > 3 else ''}, "
                f"which {type(model).__name__} never predicts: it was fitted on the classes {shown}; pass held-out "
                "labels of those classes (or leave out the held-out data: --dataset, eval_data)",
                classes=values[:20],
            )
    ids = all(isinstance(v, int) for v in values)
    if labels:
        if ids and all(0 <= v < len(labels) for v in values):
            return [str(labels[v]) for v in values]
        raise InvalidInput(
            f"{len(labels)} labels ({', '.join(map(repr, list(labels)[:3]))} ...) name class ids 0..{len(labels) - 1}, "
            f"but {type(model).__name__} was fitted on the classes {shown}, "
            f"{'which they do not all index' if ids else 'which name themselves'}; leave labels out",
            classes=values[:20],
        )
    return None if ids and values == list(range(len(values))) else [str(v) for v in values]


def _converter_options(model: Any) -> dict[int, dict[str, Any]] | None:
    """``zipmap=False`` (plain tensors, not a list of label -> probability maps) where the converter has it.

    Some classifier converters (LinearSVC's) have no ``zipmap`` option and already output plain tensors;
    skl2onnx rejects an option a converter does not declare.
    """
    if task_of(model) != "classification":
        return None
    estimator = final_estimator(model)
    try:
        from skl2onnx import get_model_alias
        from skl2onnx.common._registration import get_converter  # NOTE: private: a move means "assume zipmap"
    except ImportError:
        return {id(estimator): {"zipmap": False}}
    try:
        allowed = get_converter(get_model_alias(type(estimator))).get_allowed_options() or {}
    except (KeyError, RuntimeError, ValueError):  # no registered converter: to_onnx reports it, naming the class
        return None
    return {id(estimator): {"zipmap": False}} if "zipmap" in allowed else None


def convert(model: Any, example: np.ndarray[Any, Any], opset: int, workdir: Path) -> tuple[Path, list[str]]:
    """Convert with a dynamic batch axis; classifiers output plain ``label`` and ``probabilities`` tensors."""
    from skl2onnx import to_onnx

    if not hasattr(model, "n_features_in_") and not hasattr(final_estimator(model), "n_features_in_"):
        raise InvalidInput(f"{type(model).__name__} is not fitted; call fit() before exporting")
    x = np.asarray(example, dtype=np.float32)
    if x.ndim != 2:
        raise InvalidInput(f"example inputs for a scikit-learn model must be 2-D (rows, features); got shape {x.shape}")
    width = getattr(model, "n_features_in_", None)
    if width is not None and x.shape[1] != width:
        raise InvalidInput(
            f"{type(model).__name__} was fitted on {width} features per row but the example inputs have "
            f"{x.shape[1]} (shape {list(x.shape)}); pass rows of {width} features (a --dataset of the same width)",
            expected=int(width),
            actual=int(x.shape[1]),
        )
    try:
        onx = to_onnx(model, x[:1], target_opset={"": opset, "ai.onnx.ml": 3}, options=_converter_options(model))
    except Exception as exc:
        raise ExportError(
            f"skl2onnx cannot convert {type(model).__name__}: {str(exc).strip().splitlines()[0]}; "
            "check that every step of the pipeline has a registered converter",
            model=type(model).__name__,
        ) from exc
    onx.graph.input[0].name = _rename_input(onx, INPUT_NAME)
    _dedupe_opsets(onx)
    path = workdir / "model.onnx"
    path.write_bytes(onx.SerializeToString())
    return path, [o.name for o in onx.graph.output]


def _dedupe_opsets(onx: Any) -> None:
    """One opset import per domain, the highest version kept.

    NOTE: skl2onnx lists the default domain twice for some converters (LogisticRegression's); ONNX Runtime's
    quantizers then refuse the whole model ("Failed to find proper ai.onnx domain").
    """
    highest: dict[str, int] = {}
    for opset in onx.opset_import:
        highest[opset.domain] = max(highest.get(opset.domain, 0), int(opset.version))
    if len(highest) == len(onx.opset_import):
        return
    from onnx import helper

    del onx.opset_import[:]
    onx.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in highest.items())


def _rename_input(onx: Any, new: str) -> str:
    old = onx.graph.input[0].name
    for node in onx.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    return new


def reference(model: Any, output_names: list[str]) -> Any:
    """The estimator's own predictions, named like the ONNX outputs."""

    def run(feeds: Feeds) -> Feeds:
        x = feeds[INPUT_NAME]
        if task_of(model) == "classification":
            label = np.asarray(model.predict(x))
            label = label.astype(object) if label.dtype.kind in "OUS" else label.astype(np.int64)
            if not hasattr(model, "predict_proba"):  # the second output holds decision scores: compare labels only
                return {output_names[0]: label}
            return {output_names[0]: label, output_names[1]: model.predict_proba(x).astype(np.float32)}
        return {output_names[0]: np.asarray(model.predict(x), dtype=np.float32).reshape(len(x), -1)}

    return run
