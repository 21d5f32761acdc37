"""Pure pieces of bench: the Pareto front, request windows, engine labels, fidelity cells."""

from __future__ import annotations

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.bench import latency_pareto_front
from kiln.bench.engines import engine_name, request_windows, variant_label
from kiln.bench.results import fidelity_text, primary_fidelity


def test_pareto_front_keeps_points_no_other_beats_on_both_axes() -> None:
    latency_ms = [1.0, 2.0, 3.0, 4.0, 2.5]
    fidelity = [0.90, 0.99, 0.95, 1.00, 0.99]
    # 3.0/0.95 is beaten by 2.0/0.99 (faster and better); 2.5/0.99 by 2.0/0.99 (faster, as good).
    assert latency_pareto_front(latency_ms, fidelity) == [True, True, False, True, False]


def test_pareto_front_keeps_identical_points_and_single_point() -> None:
    assert latency_pareto_front([1.0, 1.0], [0.9, 0.9]) == [True, True]
    assert latency_pareto_front([5.0], [0.1]) == [True]
    assert latency_pareto_front([], []) == []


def test_pareto_front_drops_a_point_as_fast_but_less_faithful() -> None:
    assert latency_pareto_front([1.0, 1.0], [0.9, 0.8]) == [True, False]


def test_pareto_front_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 latencies but 1 fidelity"):
        latency_pareto_front([1.0, 2.0], [0.9])


def test_request_windows_are_disjoint_natural_order_slices() -> None:
    windows = request_windows(rows=10, batch_size=3)
    assert [w.tolist() for w in windows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert len(request_windows(rows=100, batch_size=1)) == 4


def test_request_windows_repeat_rows_when_the_set_is_smaller_than_a_request() -> None:
    (window,) = request_windows(rows=3, batch_size=5)
    assert window.tolist() == [0, 1, 2, 0, 1]


def test_variant_label_is_the_last_transform_or_fp32(mlp_artifacts: list[artifacts.Artifact]) -> None:
    base, same, _ = mlp_artifacts
    assert variant_label(base) == "fp32"
    assert variant_label(same) == "resaved"
    assert engine_name(same) == "mlp v2 (resaved)"


def test_primary_fidelity_prefers_cosine_then_task_score_then_error() -> None:
    assert primary_fidelity({"mean_cosine": 0.99, "worst_cosine": 0.9}) == ("mean cosine to reference", 0.99)
    assert primary_fidelity({"accuracy": 0.75, "max_abs_error": 0.1}) == ("accuracy", 0.75)
    assert primary_fidelity({"max_abs_error": 0.5}) == ("− max abs error vs reference", -0.5)
    assert primary_fidelity({}) is None
    assert fidelity_text({"accuracy": 0.75, "max_abs_error": 0.0}) == "acc 0.7500, Δmax 0.0e+00"
    assert np.isfinite(primary_fidelity({"r2": 0.5})[1])  # type: ignore[index]
