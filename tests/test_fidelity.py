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


# --- found in review: each failed before its fix ----------------------------------------------------------------------


def test_labels_of_shape_n_by_1_are_scored_row_by_row() -> None:
    # (N, 1) labels (a PyTorch target column) broadcast against (N,) predictions to an (N, N) comparison
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]], dtype=np.float32)
    labels = np.array([[0], [1], [1], [1]])
    assert task_score(probabilities, labels, "classification") == {"accuracy": 0.75}
    targets = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    predicted = np.array([[1.0], [2.0], [3.0], [5.0]], dtype=np.float32)
    assert task_score(predicted, targets, "regression")["r2"] == pytest.approx(1 - 1 / 5)


def test_float_labels_that_are_whole_numbers_are_class_ids() -> None:
    # BCE targets are 0.0/1.0 floats: they were refused as "not class ids"
    logits = np.array([[2.0], [-1.0], [0.5], [0.1]], dtype=np.float32)
    assert task_score(logits, np.array([1.0, 0.0, 0.0, 1.0], dtype=np.float32), "classification") == {"accuracy": 0.75}


def test_labels_outside_the_scored_classes_are_refused_not_scored_zero() -> None:
    # wine's classes 1, 2, 3 against three probability columns scored accuracy 0.0 for every model, blinding the guard
    probabilities = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    with pytest.raises(
        InvalidInput, match=r"labels run from 1 to 3 but the model scores 3 classes, whose ids are 0..2"
    ):
        task_score(probabilities, np.array([1, 2, 3, 3]), "classification")
    with pytest.raises(InvalidInput, match=r"labels run from 1 to 2 but the model scores 2 classes"):
        task_score(np.array([[0.9], [0.1]], dtype=np.float32), np.array([2, 1]), "classification")
    with pytest.raises(InvalidInput, match=r"3 labels for 4 rows"):
        task_score(probabilities, np.array([0, 1, 2]), "classification")


def test_a_nan_score_is_a_wrong_prediction_not_class_0() -> None:
    # np.argmax puts a NaN row in class 0 and a NaN logit compares false (class 0): an fp16 variant that overflows
    # on rows of class 0 kept its accuracy
    probabilities = np.array([[np.nan, np.nan], [0.2, 0.8], [np.nan, 0.1]], dtype=np.float32)
    assert task_score(probabilities, np.array([0, 1, 0]), "classification") == {"accuracy": pytest.approx(1 / 3)}
    # a probability column with a NaN is still cut at 0.5 (a NaN minimum made it a logit column, cut at 0)
    column = np.array([[np.nan], [0.1], [0.9], [0.2]], dtype=np.float32)
    assert task_score(column, np.array([0, 0, 1, 0]), "classification") == {"accuracy": 0.75}


def test_r2_on_labels_without_variance_follows_scikit_learn() -> None:
    # the total sum of squares fell back to 1.0: one row (or constant labels) gave 1 - squared error, e.g. -99
    from sklearn.metrics import r2_score

    labels = np.array([3.0, 3.0], dtype=np.float32)
    for predicted in (np.array([[3.0], [3.0]]), np.array([[13.0], [3.0]])):
        assert task_score(predicted, labels, "regression")["r2"] == r2_score(labels, predicted.ravel())
    nan = task_score(np.array([[np.nan], [3.0]]), labels, "regression")["r2"]
    assert np.isnan(nan)  # the guard compares NaN false and refuses the variant


def test_r2_of_a_multi_output_regressor_is_the_mean_over_outputs() -> None:
    # (N, 2) outputs crashed with numpy's "cannot reshape array of size 8 into shape (4,)"
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    labels = rng.normal(size=(4, 2))
    predicted = labels + rng.normal(scale=0.3, size=(4, 2))
    assert task_score(predicted, labels, "regression")["r2"] == pytest.approx(r2_score(labels, predicted))
    with pytest.raises(InvalidInput, match=r"labels have shape \[4, 1\] but the model predicts \[4, 2\] values"):
        task_score(predicted, labels[:, 0], "regression")


def test_class_names_against_class_ids_are_refused_not_scored_zero() -> None:
    # a scikit-learn model fitted on names, scored against a bundled dataset's ids, read accuracy 0.0: a blind guard
    names = np.array(["barolo", "barbera", "barolo"], dtype=object)
    with pytest.raises(InvalidInput, match=r"predicts class names \('barolo', 'barbera', 'barolo' ...\).*int64 values"):
        task_score(names, np.array([0, 1, 0], dtype=np.int64), "classification")
    assert task_score(names, np.array(["barolo", "barolo", "barolo"]), "classification") == {
        "accuracy": pytest.approx(2 / 3)
    }
