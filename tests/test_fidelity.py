"""kiln.fidelity: the task score behind optimize's accuracy guard and bench's fidelity column."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import InvalidInput
from kiln.fidelity import relative_drop, task_score


def test_a_binary_classifiers_single_column_is_cut_into_classes() -> None:
    # a logit column (BCEWithLogits) is cut at 0, a probability column at 0.5; before, the raw floats were compared
    # with the 0/1 labels, every model scored 0, and the accuracy guard passed any variant
    labels = np.array([1, 0, 0, 1])
    logits = np.array([[2.0], [-1.0], [0.5], [0.1]], dtype=np.float32)
    probabilities = np.array([[0.9], [0.2], [0.6], [0.7]], dtype=np.float32)
    assert task_score(logits, labels, "classification") == {"accuracy": 0.75}
    assert task_score(probabilities, labels, "classification") == {"accuracy": 0.75}
    damaged = np.array([[-2.0], [-1.0], [0.5], [-0.1]], dtype=np.float32)  # a variant that lost the signal
    assert relative_drop(0.75, task_score(damaged, labels, "classification")["accuracy"]) > 0.5


def test_labels_that_are_not_class_ids_are_refused() -> None:
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"labels are <U\d+ values \('setosa', 'virginica' ...\).*class ids 0..K-1"):
        task_score(probabilities, np.array(["setosa", "virginica"]), "classification")
    assert task_score(probabilities, np.array([0, 1]), "classification") == {"accuracy": 1.0}
    labels_out = np.array([0, 1], dtype=np.int64)  # a scikit-learn label output: class ids as they are
    assert task_score(labels_out, np.array([0, 0]), "classification") == {"accuracy": 0.5}
