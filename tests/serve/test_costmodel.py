"""kiln.serve.costmodel: the learned batch cost and the cheapest cut of a queue into batches."""

from __future__ import annotations

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.serve import BatchCostModel
from kiln.serve.model import ServedModel
from kiln.serve.protocol import InferRequest


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


def test_a_fast_outlier_does_not_turn_a_term_negative_or_move_the_fixed_cost() -> None:
    # No attention term to speak of at these lengths, and one long batch measured 30% fast: a plain fit turns the
    # quadratic term negative and the linear one up; clipping the quadratic term to zero then leaves the fixed
    # cost about 10% low (0.0018), a non-negative but not robust fit about 10% high (0.0022).
    shapes = ((1, 16), (2, 16), (4, 16), (8, 16), (1, 32), (4, 32), (1, 64), (2, 64), (4, 64), (1, 128))
    samples = [(r, n, (0.002 + 1.5e-4 * r * n) * (0.7 if (r, n) == (1, 128) else 1.0)) for r, n in shapes]
    samples += samples[:6]  # 16 in all: the model refits at each of its first 16 samples
    model = BatchCostModel()
    for sample in samples:
        model.observe(*sample)
    fixed, per_token, per_token2 = model.coefficients
    assert min(fixed, per_token, per_token2) >= 0
    assert fixed == pytest.approx(0.002, rel=0.05)
    assert per_token == pytest.approx(1.5e-4, rel=0.05)


def test_the_first_samples_are_each_fitted_not_only_the_first_three() -> None:
    # A tensor model's warm-up on one instance: 1, 2, 8 and 32 rows, twice each. Alone, the first three say
    # that 2 rows cost twice 1 row: no fixed cost, so merging requests would never pay. The rest show 1.6 ms of
    # fixed cost a call (0.2 ms a row). The model used to fit the first three and then wait for 16 more.
    model = BatchCostModel()
    for rows, seconds in ((1, 0.001), (1, 0.001), (2, 0.002), (2, 0.002)):
        model.observe(rows, 1, seconds)
    for rows in (8, 8, 32, 32):
        model.observe(rows, 1, 0.0016 + 0.0002 * rows)
    assert model.coefficients[0] > 0.0005
    assert model.batching_gain(32, 1) > 2


def test_refit_fits_every_sample_in_the_window() -> None:
    model = BatchCostModel()
    for i in range(16):  # no fixed cost: 1 ms a row
        model.observe((1, 2, 8, 32)[i % 4], 1, 0.001 * (1, 2, 8, 32)[i % 4])
    for i in range(15):  # 2 ms a call: the 17th to 31st samples wait for the 32nd one's refit
        model.observe((1, 2, 8, 32)[i % 4], 1, 0.002 + 0.001 * (1, 2, 8, 32)[i % 4])
    before = model.coefficients
    assert before[0] == pytest.approx(0.0, abs=1e-9)
    model.refit()
    assert model.coefficients != before
    assert len(model.samples) == 31


def test_batches_slowed_down_by_another_process_do_not_skew_the_fit() -> None:
    # Warm-up on a shared machine: a few batches lose their core for a while and take 2-4x their cost.
    rng = np.random.default_rng(0)
    model = BatchCostModel()
    shapes = [(r, n) for r in (1, 2, 4, 8) for n in (16, 32, 64, 128)]
    for i in range(64):
        rows, length = shapes[i % len(shapes)]
        seconds = (0.002 + 1.2e-4 * rows * length) * rng.uniform(0.97, 1.03)
        if i % 8 == 3:
            seconds *= rng.uniform(2.0, 4.0)
        model.observe(rows, length, seconds)
    fixed, per_token, per_token2 = model.coefficients
    assert fixed == pytest.approx(0.002, rel=0.15)
    assert per_token == pytest.approx(1.2e-4, rel=0.1)
    assert per_token2 < 1e-7


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


def test_may_share_batch_is_exactly_whether_a_pair_costs_less_together() -> None:
    model = fitted(fixed=0.002, per_token=2e-4, per_token2=1e-7)
    for rows_a in (1, 3):
        for rows_b in (1, 2):
            for length_a in (5, 20, 40, 120):
                for length_b in (5, 12, 22, 30, 41, 128):
                    apart = model.predict(rows_a, length_a) + model.predict(rows_b, length_b)
                    together = model.predict(rows_a + rows_b, max(length_a, length_b))
                    shares = model.may_share_batch(rows_a, length_a, rows_b, length_b)
                    assert shares == (together < apart), (rows_a, length_a, rows_b, length_b)
                    assert shares == model.may_share_batch(rows_b, length_b, rows_a, length_a)


def test_no_least_cost_batch_holds_a_pair_that_may_not_share_one() -> None:
    """The batcher drops candidates that may not share a batch with the oldest request before planning."""
    model = fitted(fixed=0.002, per_token=2e-4, per_token2=1e-7)
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = [int(n) for n in rng.choice([5, 8, 12, 15, 20, 26, 35, 50, 80, 128], size=12)]
        rows = [int(r) for r in rng.integers(1, 4, size=12)]
        for batch in model.plan(lengths, rows, max_rows=32):
            for i in batch:
                for j in batch:
                    if i != j:
                        assert model.may_share_batch(rows[i], lengths[i], rows[j], lengths[j])


class _Recorded(BatchCostModel):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def observe(self, rows: int, length: int, seconds: float) -> None:
        self.seen.append((rows, length))
        super().observe(rows, length, seconds)


@pytest.mark.slow
def test_token_id_requests_to_a_text_model_are_costed_by_their_padded_length(
    minilm_artifact: artifacts.Artifact,
) -> None:
    # a client that tokenizes itself sends input_ids of 20 tokens a row: the cost model must learn 20 tokens, not 1
    # (a length of 1 for 20-token batches turns the per-token cost into a fixed one, and batching looks free)
    model = ServedModel(minilm_artifact, instances=1)
    ids = np.full((2, 20), 1000, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    names = [spec.name for spec in model.engines[0].inputs]
    request = InferRequest(inputs={name: feeds[name] for name in names}, datatypes=dict.fromkeys(names, "INT64"))
    work = model.prepare(request, max_rows=8)
    assert work.length == 20
    model.cost = recorded = _Recorded()
    model.execute([work, model.prepare(request, max_rows=8)])
    assert recorded.seen == [(4, 20)]


@pytest.mark.slow
def test_warmup_leaves_the_cost_model_fitted_on_every_shape_it_measured(minilm_artifact: artifacts.Artifact) -> None:
    # ten text shapes, two measured runs each: 20 samples, and the periodic refit comes after the 16th
    model = ServedModel(minilm_artifact, instances=1)
    model.warmup(max_batch_size=32)
    assert len(model.cost.samples) == 20
    fitted_at_warmup = model.cost.coefficients
    model.cost.refit()
    assert model.cost.coefficients == fitted_at_warmup
