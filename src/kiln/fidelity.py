"""How close a variant's outputs are to its parent's, and how well it does the task.

Used by optimize (the accuracy guard) and bench (the fidelity column), so both report the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.errors import InvalidInput
from kiln.types import TensorSpec

Array = np.ndarray[Any, Any]


def cosine_rows(a: Array, b: Array) -> Array:
    """Cosine similarity of matching rows of two (N, D) arrays."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    result: Array = num / np.maximum(den, 1e-12)
    return result


def topk_overlap(reference: Array, candidate: Array, k: int = 10) -> float:
    """Mean overlap of each row's k nearest neighbours (cosine) under the two embeddings (1.0 = same lists)."""
    k = min(k, len(reference) - 1)
    if k < 1:
        return 1.0

    def neighbours(x: Array) -> Array:
        x = x.astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        nearest: Array = np.argpartition(-sims, k, axis=1)[:, :k]
        return nearest

    ref, cand = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref, cand, strict=True)]))


def embedding_fidelity(reference: Array, candidate: Array) -> dict[str, float]:
    """Mean and worst cosine to the parent, plus top-10 neighbour overlap on the same texts."""
    cos = cosine_rows(reference, candidate)
    return {
        "mean_cosine": float(np.mean(cos)),
        "worst_cosine": float(np.min(cos)),
        "top10_overlap": topk_overlap(reference, candidate, 10),
    }


def label_output(outputs: Sequence[TensorSpec], labels: Array | None, task: str, *, scored: str) -> str | None:
    """The output that gives a classifier's own labels, of the held-out labels' kind, or None.

    scikit-learn's ``label`` maps to the model's classes (1, 2, 3 or "setosa" ...), where an argmax over its
    probabilities (``scored``) gives positions 0..K-1, which never equal such labels: the task is scored on it.
    """
    if task != "classification" or labels is None:
        return None
    strings = labels.dtype.kind in "OSU"
    return next(
        (
            o.name
            for o in outputs
            if o.name != scored
            and len(o.shape) in (1, 2)
            and o.shape[1:] in ((), (1,))
            and (o.dtype == "BYTES" if strings else o.dtype.startswith(("INT", "UINT")))
        ),
        None,
    )


def check_label_shape(labels: Array) -> None:
    """A classifier's held-out labels are one class per row: shape [N] or [N, 1].

    Raises:
        InvalidInput: another shape ([N, 2] crashed in NumPy's broadcasting).
    """
    if labels.ndim != 1 and labels.shape[1:] != (1,):
        raise InvalidInput(
            f"the held-out labels have shape {list(labels.shape)}; a classifier's labels are one class per row, "
            f"shape [{len(labels)}]: pass one label per row"
        )


def unseen_labels(labels: Any, classes: Sequence[Any]) -> list[Any]:
    """The distinct held-out labels that are none of ``classes`` (a model's), in sorted order."""
    known = set(classes)
    return [v for v in np.unique(np.asarray(labels)).tolist() if v not in known]


def check_label_classes(labels: Array, classes: Sequence[Any], output: str) -> None:
    """Held-out labels scored on a classifier's own label output must be among the classes it gives.

    Raises:
        InvalidInput: a label the model can never predict (labels 1..10 for classes 0..9, say): its accuracy would
            read near 0 for the parent and every variant alike, and the accuracy guard would pass any of them.
    """
    unseen = unseen_labels(labels, classes)
    if unseen:
        shown = ", ".join(map(repr, list(classes)[:6])) + (" ..." if len(classes) > 6 else "")
        raise InvalidInput(
            f"the held-out labels hold {', '.join(map(repr, unseen[:3]))}{' ...' if len(unseen) > 3 else ''}, "
            f'which the model\'s "{output}" output never gives: its classes are {shown}; pass held-out labels '
            "of those classes",
            classes=list(classes)[:20],
        )


def predictions(output: Array, task: str) -> Array:
    """Class ids from probabilities/logits (2-D) or from labels (1-D integers); values (N, outputs) for regression.

    One float column is a binary classifier's score: a probability of class 1 when every value lies in [0, 1]
    (cut at 0.5), a logit otherwise (cut at 0). A row with a NaN or infinite score predicts class -1, which no
    label equals: a variant that overflows is wrong there, not class 0.
    """
    if task == "regression":
        return output.reshape(len(output), -1)
    if output.ndim == 2 and output.shape[1] > 1:
        classes: Array = np.argmax(output, axis=1)
        if output.dtype.kind == "f":
            classes[~np.isfinite(output).all(axis=1)] = -1
        return classes
    flat = output.reshape(len(output))
    if flat.dtype.kind == "f":
        finite = flat[np.isfinite(flat)]
        cut = 0.5 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 0.0
        binary: Array = (flat > cut).astype(np.int64)
        binary[~np.isfinite(flat)] = -1
        return binary
    return flat


def task_score(output: Array, labels: Array, task: str) -> dict[str, float]:
    """Accuracy for classification; R² (higher is better, so the same guard applies) for regression.

    R² is averaged over the outputs of a multi-output regressor; on labels without variance (one row, say) it is
    1.0 for exact predictions and 0.0 otherwise, as scikit-learn's ``r2_score`` gives.

    Raises:
        InvalidInput: labels of another row count, or classification labels that are not class ids of the output
            scored (strings, say, or 1..3 against three probability columns): they could never equal a predicted
            class, and an accuracy of 0 would let the accuracy guard pass any variant.
    """
    if len(labels) != len(output):
        raise InvalidInput(
            f"the held-out data has {len(labels)} labels for {len(output)} rows of outputs; pass one label per row"
        )
    pred = predictions(output, task)
    if task == "regression":
        return {"r2": _r2(labels.reshape(len(labels), -1).astype(np.float64), pred.astype(np.float64))}
    if labels.ndim == 2 and labels.shape[1] == 1:  # (N, 1) labels against (N,) predictions broadcast to (N, N)
        labels = labels.reshape(len(labels))
    check_label_shape(labels)
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):  # 0.0/1.0 targets of BCE: class ids as floats
        labels = labels.astype(np.int64)
    if pred.dtype.kind not in "iub":
        if (pred.dtype.kind in "OSU") != (labels.dtype.kind in "OSU"):
            raise InvalidInput(
                f"the model predicts class names ({', '.join(map(repr, pred[:3].tolist()))} ...) but the held-out "
                f"labels are {labels.dtype} values ({', '.join(map(repr, labels[:3].tolist()))} ...), which never "
                "equal them; store the labels as the model's class names"
            )
        return {"accuracy": float(np.mean(pred == labels))}
    if labels.dtype.kind not in "iub":
        raise InvalidInput(
            f"the held-out labels are {labels.dtype} values ({', '.join(map(repr, labels[:3].tolist()))} ...) but the "
            "model predicts class ids; store the labels as class ids 0..K-1, in the order of the model's outputs"
        )
    classes = output.shape[1] if output.dtype.kind == "f" and output.ndim == 2 and output.shape[1] > 1 else 2
    if output.dtype.kind == "f" and labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InvalidInput(
            f"the held-out labels run from {labels.min()} to {labels.max()} but the model scores {classes} classes, "
            f"whose ids are 0..{classes - 1} in the order of its outputs; store the labels as those class ids (or "
            "score the model's own label output)"
        )
    return {"accuracy": float(np.mean(pred == labels))}


def _r2(labels: Array, pred: Array) -> float:
    """R² of (N, outputs) predictions, averaged over the outputs."""
    if labels.shape != pred.shape:
        raise InvalidInput(
            f"the held-out labels have shape {list(labels.shape)} but the model predicts {list(pred.shape)} values; "
            "pass one label per output of each row"
        )
    residual = np.sum((labels - pred) ** 2, axis=0)
    total = np.sum((labels - labels.mean(axis=0)) ** 2, axis=0)
    constant = np.where(residual == 0, 1.0, 0.0)
    per_output = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), constant)
    # a NaN prediction stays NaN: the guard compares it false and refuses the variant
    return float(np.mean(np.where(np.isnan(residual), np.nan, per_output)))


def output_fidelity(reference: Array, candidate: Array) -> dict[str, float]:
    """Max absolute and relative error between matching outputs (any task)."""
    ref = reference.astype(np.float64)
    diff = np.abs(ref - candidate.astype(np.float64))
    return {
        "max_abs_error": float(diff.max(initial=0.0)),
        "max_rel_error": float((diff / np.maximum(np.abs(ref), 1e-6)).max(initial=0.0)),
    }


def relative_drop(parent: float, child: float) -> float:
    """Relative loss of a higher-is-better score (0.01 = 1% worse); negative when the child is better."""
    if parent == 0:
        return 0.0 if child >= 0 else 1.0
    return (parent - child) / abs(parent)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (quality, speed) points no other point beats on both (higher is better for both).

    A point is dominated when another is at least as good on both axes and strictly better on one.
    """
    front = []
    for i, (q_i, s_i) in enumerate(points):
        dominated = any(
            q_j >= q_i and s_j >= s_i and (q_j > q_i or s_j > s_i) for j, (q_j, s_j) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front
