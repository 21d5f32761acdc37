"""Goodput-aware batch size: the noise-scale estimator against the exact value, the sizer's choices, a real run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kiln.data import bundled_dataset
from kiln.errors import ConfigError
from kiln.train import TrainSettings, train
from kiln.train.goodput import ConsecutiveGradients, GoodputSizer, NoiseScale, efficiency, observe_pair


def test_noise_scale_estimate_matches_the_exact_value_on_real_data() -> None:
    """Least squares on diabetes at a fixed weight: per-row gradients give the exact tr(Σ)/|G|² to compare with."""
    data = bundled_dataset("diabetes")
    x = torch.from_numpy(data.x_train).double()
    x = (x - x.mean(0)) / x.std(0)
    y = torch.from_numpy(data.y_train).double()
    y = (y - y.mean()) / y.std()
    w = torch.full((x.shape[1],), 0.05, dtype=torch.float64)
    per_row = 2 * (x @ w - y)[:, None] * x  # (N, F): gradient of each row's squared error
    mean = per_row.mean(0)
    exact = float(((per_row - mean) ** 2).sum(1).mean() / mean.pow(2).sum())

    def grad_sq(rows: torch.Tensor) -> float:
        return float(per_row[rows].mean(0).pow(2).sum())

    gen = torch.Generator().manual_seed(0)
    estimate = NoiseScale(decay=0.995)
    for _ in range(3000):
        rows = torch.randint(len(x), (64,), generator=gen)  # i.i.d. rows, as the estimator assumes
        estimate.update(grad_sq(rows[:8]), 8, grad_sq(rows), 64)
    assert estimate.value is not None
    assert estimate.value == pytest.approx(exact, rel=0.25), (estimate.value, exact)


def test_consecutive_steps_recover_a_known_noise_scale() -> None:
    """Synthetic step gradients G + noise/sqrt(M), per-row noise N(0, σ²I): the noise scale is d·σ²/|G|²."""
    gen = torch.Generator().manual_seed(0)
    dims, sigma, rows = 200, 3.0, 16
    true_grad = torch.randn(dims, generator=gen)
    exact = dims * sigma**2 / float(true_grad.pow(2).sum())  # ~9 rows
    noise = NoiseScale(decay=0.99)
    pairs = ConsecutiveGradients(noise, every=2)
    for step in range(4000):
        grad = true_grad + sigma * torch.randn(dims, generator=gen) / math.sqrt(rows)
        pairs.observe(step, rows, [grad[:50], grad[50:]])  # several parameter tensors: flattened together
    assert noise.updates == 2000  # one sample per pair of steps (0, 1), (2, 3), ...
    assert noise.value == pytest.approx(exact, rel=0.15), (noise.value, exact)


def test_two_halves_recover_the_noise_scale_where_consecutive_steps_read_a_moving_gradient_as_noise() -> None:
    """At a high lr one update moves the gradient (here it swings back and forth across a valley: G, -G, G ...).
    Two consecutive steps then average to almost nothing, and their estimate says "all noise"; the two halves of
    one batch see the same weights and recover d·σ²/|G|²."""
    gen = torch.Generator().manual_seed(0)
    dims, sigma, rows = 200, 3.0, 16
    true_grad = torch.randn(dims, generator=gen)
    exact = dims * sigma**2 / float(true_grad.pow(2).sum())
    halves, consecutive = NoiseScale(decay=0.99), NoiseScale(decay=0.99)
    pairs = ConsecutiveGradients(consecutive, every=2)
    for step in range(4000):
        at_weights = true_grad if step % 2 == 0 else -true_grad
        half_a, half_b = (at_weights + sigma * torch.randn(dims, generator=gen) / math.sqrt(rows) for _ in range(2))
        observe_pair(halves, half_a, half_b, rows)
        pairs.observe(step, 2 * rows, [(half_a + half_b) / 2])
    assert halves.value == pytest.approx(exact, rel=0.15), (halves.value, exact)
    assert consecutive.value == math.inf


def test_a_step_that_samples_the_noise_scale_from_its_halves_applies_the_whole_batch_gradient(
    make_trainer: Callable[..., Any],
) -> None:
    """Step 0 runs its batch as two halves (noise_every divides it): the update must equal one whole-batch step."""

    def first_step(sizer: GoodputSizer | None) -> tuple[dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        settings = TrainSettings(
            dataset="digits", hidden_sizes=(32,), batch_size=16, optimizer="sgd", lr=0.5, track=False, export=False
        )  # SGD: the update is the gradient itself (Adam's first step is nearly its sign)
        trainer = make_trainer(settings, sizer=sizer, optimizer_kind="sgd")
        loss, rows = trainer.train_step()
        assert rows == 16
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, loss

    sizer = GoodputSizer(base_batch=16, max_batch=64)
    halves, halves_loss = first_step(sizer)
    whole, whole_loss = first_step(None)
    assert sizer.noise.updates == 1 and sizer.noise.value is not None  # the halves gave a sample at step 0
    assert halves_loss == pytest.approx(whole_loss, rel=1e-6)
    for key, value in whole.items():
        torch.testing.assert_close(halves[key], value, rtol=1e-5, atol=1e-7)


def test_consecutive_steps_skip_pairs_that_differ_in_rows_or_are_not_adjacent() -> None:
    noise = NoiseScale()
    pairs = ConsecutiveGradients(noise, every=4)
    grad = [torch.ones(3)]
    pairs.observe(0, 16, grad)
    pairs.observe(1, 8, grad)  # an epoch's short last batch
    pairs.observe(2, 16, grad)  # not a multiple of `every`: nothing held
    pairs.observe(3, 16, grad)
    pairs.observe(4, 16, grad)
    pairs.observe(6, 16, grad)  # step 5 never came (a resume): not a pair
    assert noise.updates == 0
    pairs.observe(8, 16, grad)
    pairs.observe(9, 16, grad)
    assert noise.updates == 1


def test_efficiency_is_one_at_the_base_and_falls_with_the_batch() -> None:
    assert efficiency(32, 32, 100.0) == 1.0
    assert efficiency(64, 32, 100.0) == pytest.approx(132 / 164)
    assert efficiency(64, 32, 1e6) == pytest.approx(1.0, abs=1e-4)  # huge noise scale: bigger costs nothing
    assert efficiency(64, 32, math.inf) == 1.0


def _sizer_with_noise(scale: float, base: int = 16, lr_scaling: str = "adascale") -> GoodputSizer:
    sizer = GoodputSizer(base_batch=base, max_batch=256, lr_scaling=lr_scaling)
    sizer.noise.grad_sq, sizer.noise.trace, sizer.noise.updates = 1.0, scale, 10_000  # settled EMA
    return sizer


def _observe(sizer: GoodputSizer, batch: int, *rows_per_s: float) -> None:
    """``min_steps`` measured steps at ``batch``, cycling through ``rows_per_s``.

    A size's first step ever is a warm-up the sizer drops; it is sent first when ``batch`` is new.
    """
    if batch not in sizer._recent:
        sizer.observe_throughput(batch, 0.0)
    for i in range(sizer.min_steps):
        sizer.observe_throughput(batch, rows_per_s[i % len(rows_per_s)])


def test_throughput_is_the_median_of_recent_steps_without_the_first() -> None:
    sizer = GoodputSizer(base_batch=16, max_batch=256)
    sizer.observe_throughput(16, 1.0)  # warm-up step: dropped
    assert 16 not in sizer.rows_per_s
    for rate in (10_000.0, 10_200.0, 900.0, 9_900.0):  # one stalled step
        sizer.observe_throughput(16, rate)
    assert sizer.rows_per_s[16] == pytest.approx(9_950.0)


def test_sizer_explores_upward_while_the_noise_scale_is_large() -> None:
    sizer = _sizer_with_noise(500.0)
    _observe(sizer, 16, 10_000.0)
    assert sizer.decide(step=100) == 32
    assert sizer.changes[-1]["from"] == 16 and sizer.changes[-1]["to"] == 32


def test_lr_follows_adascale_gain_or_the_plain_rule() -> None:
    adascale, rule = _sizer_with_noise(500.0), _sizer_with_noise(500.0, lr_scaling="rule")
    for sizer in (adascale, rule):
        assert sizer.lr_factor("sgd") == 1.0  # at the base batch
        sizer.current = 64
    gain = 4 * (500 + 16) / (500 + 64)  # S·E(M): a 4x batch is worth 3.66 base steps at this noise scale
    assert adascale.lr_factor("sgd") == pytest.approx(gain)
    assert adascale.lr_factor("adamw") == pytest.approx(math.sqrt(gain))
    assert rule.lr_factor("sgd") == 4.0 and rule.lr_factor("adamw") == pytest.approx(2.0)
    assert _sizer_with_noise(1e9).lr_factor("sgd") == 1.0  # all noise at the base: gain = S = 1


def test_sizer_judges_a_size_only_after_min_steps_steps_at_it() -> None:
    sizer = _sizer_with_noise(500.0)
    for rate in (0.0, *[10_000.0] * (sizer.min_steps - 1)):  # warm-up + min_steps - 1 measured steps
        sizer.observe_throughput(16, rate)
    assert not sizer.due() and sizer.decide(step=10) == 16 and not sizer.changes  # one step short
    sizer.observe_throughput(16, 10_000.0)
    assert sizer.due() and sizer.decide(step=11) == 32
    sizer.observe_throughput(32, 0.0)  # the new size's warm-up step
    assert sizer.decide(step=12) == 32  # not judged yet, though its figure is unknown
    for step in range(13, 13 + sizer.min_steps - 1):  # 16 is clearly better, but 32 is judged only at its 8th step
        sizer.observe_throughput(32, 1_000.0)
        assert sizer.decide(step=step) == 32
    sizer.observe_throughput(32, 1_000.0)
    assert sizer.decide(step=99) == 16


def test_sizer_does_not_switch_for_a_goodput_gain_within_the_margin() -> None:
    sizer = _sizer_with_noise(40.0)  # small enough that 64 rows are not worth exploring from 32
    _observe(sizer, 16, 10_000.0)
    assert sizer.decide(step=1) == 32
    # 32 rows are worth (40+16)/(40+32) = 0.778 of their rows: at 12,530 rows/s, 16 has 2.5% more goodput
    _observe(sizer, 32, 12_530.0)
    assert sizer.decide(step=2) == 32  # stays: 2.5% is within the 5% margin (and 64 is not worth exploring)
    assert len(sizer.changes) == 1
    _observe(sizer, 32, 10_000.0)  # the median of 32's steps falls to 11,265 rows/s: 16 has 14% more goodput
    assert sizer.decide(step=3) == 16


def test_sizer_stays_when_the_noise_scale_is_small() -> None:
    sizer = _sizer_with_noise(10.0)
    _observe(sizer, 16, 10_000.0)
    assert sizer.decide(step=100) == 16 and not sizer.changes


def test_sizer_goes_back_when_the_bigger_batch_was_not_faster() -> None:
    sizer = _sizer_with_noise(100.0)
    _observe(sizer, 16, 10_000.0)
    assert sizer.decide(step=1) == 32
    _observe(sizer, 32, 10_500.0)  # 5% more rows/s cannot pay for 32 rows' lower efficiency
    assert sizer.decide(step=2) == 16


def _line(batch: int, fixed_s: float = 1e-3, per_row_s: float = 1e-5) -> float:
    """Rows/s of a step that costs ``fixed_s + per_row_s * batch`` seconds."""
    return batch / (fixed_s + per_row_s * batch)


def test_sizer_predicts_unmeasured_sizes_from_a_step_time_line_and_jumps_to_the_best() -> None:
    sizer = _sizer_with_noise(2000.0)  # nearly all noise: bigger batches keep almost all of a row's worth
    _observe(sizer, 16, _line(16))
    assert sizer.decide(step=1) == 32  # one size measured: nothing to fit, so explore the doubling
    _observe(sizer, 32, _line(32))
    assert sizer.predicted_rows_per_s(128) == pytest.approx(_line(128))
    assert sizer.predicted_rows_per_s(256) is None  # beyond 4x the largest measured size: not extrapolated
    assert sizer.decide(step=2) == 128  # straight to the best predicted size, without trying 64 on the way
    assert sizer.changes[-1]["measured"] == [16, 32]


def test_sizer_grows_one_doubling_at_a_time_while_the_noise_scale_is_infinite() -> None:
    # |G|² estimated <= 0: the noise scale is "infinite", which rates every size's efficiency 1; the line would
    # send the batch from 32 straight to 128, four times the largest measured size
    sizer = GoodputSizer(base_batch=16, max_batch=256)
    sizer.noise.grad_sq, sizer.noise.trace, sizer.noise.updates = -1.0, 5.0, 3
    assert sizer.noise.value == math.inf
    _observe(sizer, 16, _line(16))
    assert sizer.decide(step=1) == 32
    _observe(sizer, 32, _line(32))
    assert sizer.goodput(128) is not None and sizer.goodput(128) > sizer.goodput(64)  # type: ignore[operator]
    assert sizer.decide(step=2) == 64  # one doubling, not the line's best
    sizer.noise.grad_sq = 1.0  # a finite noise scale (5 rows), now small: the batch goes back down
    _observe(sizer, 64, _line(64))
    assert sizer.decide(step=3) == 16


def test_sizer_does_not_explore_a_size_the_line_predicts_worse() -> None:
    # 64 -> 128 keeps 88% of a row's worth at this noise scale, so doubling would pass the exploration rule;
    # but the step-time line says 128 rows run only 14% faster per row, so 128 has less goodput than 64
    sizer = _sizer_with_noise(400.0)
    sizer.current = 64
    for batch in (16, 32, 64):
        _observe(sizer, batch, _line(batch, per_row_s=5e-5))
    assert sizer.goodput(128) is not None and sizer.goodput(128) < sizer.goodput(64)  # type: ignore[operator]
    assert sizer.decide(step=3) == 64 and not sizer.changes
    assert 128 not in sizer.rows_per_s


def test_sizer_does_not_extrapolate_a_line_that_says_bigger_steps_are_free() -> None:
    sizer = _sizer_with_noise(2000.0)
    _observe(sizer, 16, 10_000.0)
    _observe(sizer, 32, 30_000.0)  # a 32-row step measured faster than a 16-row one: noise
    assert sizer.predicted_rows_per_s(64) is None


def test_adaptive_run_grows_the_batch_and_records_why(make_settings: Callable[..., TrainSettings]) -> None:
    result = train(make_settings(dataset="digits", hidden_sizes=(128,), batch_size=8, epochs=6, adaptive_batch=True))
    assert result.metrics["test_accuracy"] >= 0.9
    assert result.batch_size_changes, "the batch never grew"
    first = result.batch_size_changes[0]
    assert first["to"] == 2 * first["from"] and first["noise_scale"] >= 2 * first["from"]
    sizes = [int(h["batch_size"]) for h in result.history]
    assert first["from"] == 8 and max(sizes) > 8  # history rows come every 10 steps: the first can follow a change
    # the lr followed the batch (Adam: square root of AdaScale's gain, which lies between 1 and the batch ratio)
    grown = [h for h in result.history if h["batch_size"] > 8]
    assert grown
    for row in grown:
        assert 1e-3 < row["lr"] <= 1e-3 * math.sqrt(row["batch_size"] / 8) * (1 + 1e-6)


def test_adaptive_batch_refuses_a_decaying_schedule() -> None:
    with pytest.raises(
        ConfigError, match='adaptive_batch changes the steps per epoch, so it needs schedule = "constant"'
    ):
        TrainSettings(adaptive_batch=True, schedule="cosine")


def test_adaptive_batch_refuses_a_token_budget() -> None:
    with pytest.raises(ConfigError, match=r"adaptive_batch .* max_tokens = 512 .* set adaptive_batch = false or"):
        TrainSettings(dataset="topics.jsonl", model="minilm", adaptive_batch=True, max_tokens=512)
