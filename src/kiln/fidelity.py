"""How close a variant's outputs are to its parent's, and how well it does the task.

Used by optimize (the accuracy guard) and bench (the fidelity column), so both report the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.errors import InvalidInput

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


def predictions(output: Array, task: str) -> Array:
    """Class ids from probabilities/logits (2-D) or from labels (1-D integers); values for regression.

    One float column is a binary classifier's score: a probability of class 1 when every value lies in [0, 1]
    (cut at 0.5), a logit otherwise (cut at 0).
    """
    if task == "regression":
        return output.reshape(len(output))
    if output.ndim == 2 and output.shape[1] > 1:
        classes: Array = np.argmax(output, axis=1)
        return classes
    flat = output.reshape(len(output))
    if flat.dtype.kind == "f":
        cut = 0.5 if flat.size and flat.min() >= 0.0 and flat.max() <= 1.0 else 0.0
        binary: Array = (flat > cut).astype(np.int64)
        return binary
    return flat


def task_score(output: Array, labels: Array, task: str) -> dict[str, float]:
    """Accuracy for classification; R² (higher is better, so the same guard applies) for regression.

    Raises:
        InvalidInput: classification labels that are not class ids (strings, say): they could never equal a
            predicted class, and an accuracy of 0 would let the accuracy guard pass any variant.
    """
    pred = predictions(output, task)
    if task == "regression":
        residual = float(np.sum((labels - pred) ** 2))
        total = float(np.sum((labels - np.mean(labels)) ** 2)) or 1.0
        return {"r2": 1.0 - residual / total}
    if labels.dtype.kind not in "iub" and pred.dtype.kind in "iub":
        raise InvalidInput(
            f"the held-out labels are {labels.dtype} values ({', '.join(map(repr, labels[:3].tolist()))} ...) but the "
            "model predicts class ids; store the labels as class ids 0..K-1, in the order of the model's outputs"
        )
    return {"accuracy": float(np.mean(pred == labels))}


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
