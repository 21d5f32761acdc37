"""kiln.serve.costmodel: the learned batch cost and the cheapest cut of a queue into batches."""

from __future__ import annotations

import pytest

from kiln.serve import BatchCostModel


def fitted(fixed: float, per_token: float, per_token2: float = 0.0) -> BatchCostModel:
    model = BatchCostModel()
    for rows in (1, 2, 4, 8, 16, 32):
        for length in (8, 16, 32, 64, 128):
            tokens = rows * length
            model.observe(rows, length, fixed + per_token * tokens + per_token2 * tokens * length)
    return model


def test_fit_recovers_the_cost_it_observed() -> None:
    model = fitted(0.004, 2e-5, 1e-7)
    fixed, per_token, per_token2 = model.coefficients
    assert fixed == pytest.approx(0.004, rel=1e-3)
    assert per_token == pytest.approx(2e-5, rel=1e-3)
    assert per_token2 == pytest.approx(1e-7, rel=1e-3)
    assert model.predict(10, 20) == pytest.approx(0.004 + 2e-5 * 200 + 1e-7 * 200 * 20, rel=1e-3)


def test_batching_gain_is_large_when_the_fixed_cost_dominates_and_about_one_when_it_does_not() -> None:
    gpu_like = fitted(fixed=0.010, per_token=1e-7)
    cpu_like = fitted(fixed=0.0001, per_token=2e-4)
    assert gpu_like.batching_gain(32, 32) > 20
    assert cpu_like.batching_gain(32, 32) == pytest.approx(1.0, abs=0.05)


def test_plan_keeps_rows_of_very_different_lengths_apart_when_padding_costs_more_than_a_call() -> None:
    model = fitted(fixed=0.002, per_token=2e-4)  # merging 5,6,7 saves two calls; padding 5 to 98 would not pay
    lengths = [100, 5, 6, 98, 7]
    batches = model.plan(lengths, [1] * 5, max_rows=32)
    grouped = sorted(sorted(lengths[i] for i in batch) for batch in batches)
    assert grouped == [[5, 6, 7], [98, 100]]
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2, 3, 4]  # every request exactly once


def test_plan_merges_everything_when_a_call_costs_more_than_padding() -> None:
    model = fitted(fixed=0.050, per_token=1e-7)
    batches = model.plan([100, 5, 6, 98, 7], [1] * 5, max_rows=32)
    assert len(batches) == 1 and sorted(batches[0]) == [0, 1, 2, 3, 4]


def test_plan_respects_max_rows_but_never_splits_a_request() -> None:
    model = fitted(fixed=0.050, per_token=1e-7)
    rows = [20, 20, 5, 40]
    batches = model.plan([10, 10, 10, 10], rows, max_rows=32)
    for batch in batches:
        assert sum(rows[i] for i in batch) <= 32 or len(batch) == 1
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2, 3]
