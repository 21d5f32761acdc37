"""Goodput-aware batch size (Pollux's idea): grow the batch while it raises training progress per second.

Progress per second ("goodput") = throughput (rows/s, measured) x statistical efficiency (how much of a row's
work still counts at this batch size). The efficiency comes from the gradient noise scale
``B_noise = tr(Σ) / |G|²`` (McCandlish et al., 2018): with ``B_noise`` rows a batch already averages out most
gradient noise, and a batch of ``M`` rows relative to the starting ``M0`` is worth
``E(M) = (B_noise + M0) / (B_noise + M)`` of its rows. Bigger batches run faster per row on most hardware
(better-filled kernels) but count less per row; the sizer picks the size where the product peaks.

The noise scale is estimated from gradient norms at two batch sizes, ``b`` and ``B`` rows, via the unbiased
estimators

    |G|²   ≈ (B |G_B|² - b |G_b|²) / (B - b)
    tr(Σ)  ≈ (|G_b|² - |G_B|²) / (1/b - 1/B)

each smoothed with an exponential moving average before the ratio is taken (the ratio of noisy estimates is
badly biased; the ratio of smoothed ones is not). In one process, a step that samples the noise scale runs its
batch of ``M`` rows as two halves (:func:`observe_pair`): each half's gradient is a ``b = M/2`` sample and the
batch's a ``B = M`` one, both at the same weights; the step applies the same gradient, at the cost of one more
forward and backward call. Under data parallelism the two sizes come from two consecutive steps
(:class:`ConsecutiveGradients`, AdaptDL's single-replica estimator: each step's gradient a ``b = M`` sample,
their mean a ``B = 2M`` one), which costs no extra call but reads as noise how far one update moves the gradient:
at a high lr that can swamp the signal.

The lr follows the batch by AdaScale's gain (Johnson et al., 2020, as Pollux does): a batch ``S = M / M0`` times
the base is worth ``r = S·E(M)`` base steps (between 1, when the gradient is all signal, and ``S``, when it is all
noise), so SGD's lr is multiplied by ``r`` and Adam's by ``sqrt(r)`` (the square-root rule for adaptive
optimisers). ``lr_scaling = "rule"`` uses the plain linear/square-root rule (``r = S``) instead.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class NoiseScale:
    """Exponential moving averages of ``|G|²`` and ``tr(Σ)``; ``value`` is their ratio (``None`` until known)."""

    decay: float = 0.9
    grad_sq: float = 0.0
    trace: float = 0.0
    updates: int = 0

    def update(self, small_sq: float, small_rows: int, big_sq: float, big_rows: int) -> None:
        """One pair of squared gradient norms: of ``small_rows`` rows and of ``big_rows`` > ``small_rows`` rows."""
        if not big_rows > small_rows > 0:
            raise ValueError(f"need big_rows > small_rows > 0, got {big_rows} and {small_rows}")
        grad_sq = (big_rows * big_sq - small_rows * small_sq) / (big_rows - small_rows)
        trace = (small_sq - big_sq) / (1.0 / small_rows - 1.0 / big_rows)
        # bias-corrected EMA (as Adam's moments): the first estimates are not pulled towards zero
        self.updates += 1
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        logger.debug("noise scale: |G|² %.4g tr(Σ) %.4g", grad_sq, trace)

    @property
    def value(self) -> float | None:
        if self.updates == 0:
            return None
        correction = 1 - self.decay**self.updates
        grad_sq, trace = self.grad_sq / correction, self.trace / correction
        if grad_sq <= 0:  # gradient all noise (late in training): any batch is "small"
            return math.inf
        return max(trace, 0.0) / grad_sq


class ConsecutiveGradients:
    """Feeds :class:`NoiseScale` from the gradients of steps ``k`` and ``k + 1`` for every ``k % every == 0``.

    Between the two steps the weights move by one update, which for a small lr changes the gradient far less
    than the noise of a batch does; the pair is skipped when the two steps differ in rows (an epoch's short last
    batch, a batch-size change).
    """

    def __init__(self, noise: NoiseScale, every: int) -> None:
        self.noise, self.every = noise, every
        self._held: tuple[int, int, torch.Tensor] | None = None  # (step, rows, flat gradient)

    def observe(self, step: int, rows: int, grads: list[torch.Tensor]) -> None:
        """The gradient (mean over ``rows`` rows) the optimizer is about to apply at ``step``."""
        held, self._held = self._held, None
        if held is not None and held[0] == step - 1 and held[1] == rows:
            observe_pair(self.noise, held[2], flat_gradient(grads), rows)
        elif step % self.every == 0 and grads:
            self._held = (step, rows, flat_gradient(grads))


def observe_pair(noise: NoiseScale, grad_a: torch.Tensor, grad_b: torch.Tensor, rows: int) -> None:
    """One sample of the noise scale from two gradients, each the mean over ``rows`` rows: their norms give
    ``E|G_rows|²`` and the norm of their mean ``|G_2rows|²``.

    The two halves of one batch (the trainer in one process) see the same weights. Two consecutive steps
    (:class:`ConsecutiveGradients`) have one update between them: at a high lr it moves the gradient as much as
    the batch noise does, their mean comes out shorter than two samples at one point would give, and the estimate
    reads that signal as noise (an underestimated ``|G|²``, down to a negative one: an infinite noise scale).
    """
    small_sq = 0.5 * float(grad_a.square().sum() + grad_b.square().sum())  # E|G_rows|² from two samples
    big_sq = float((grad_a + grad_b).mul_(0.5).square().sum())  # |G_2rows|²: their mean
    noise.update(small_sq, rows, big_sq, 2 * rows)


def flat_gradient(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients as one float32 vector (a copy)."""
    return torch.cat([g.detach().reshape(-1).float() for g in grads])


def efficiency(batch: int, base_batch: int, noise_scale: float) -> float:
    """Statistical efficiency of ``batch`` rows relative to ``base_batch``: (B_noise + M0) / (B_noise + M)."""
    if math.isinf(noise_scale):
        return 1.0
    return (noise_scale + base_batch) / (noise_scale + batch)


@dataclass
class GoodputSizer:
    """Chooses the batch size (``base_batch * 2**k`` up to ``max_batch``) with the highest goodput.

    Throughput is measured: a size's figure is the median rows/s of its recent steps, and a size is judged every
    ``min_steps`` measured steps it runs (so it runs that many before a change). Once two sizes are measured, the
    throughput of the others is predicted from a step-time line ``t(M) = fixed + per_row·M`` fitted to the
    measured ones (Pollux models throughput the same way), up to ``extrapolate`` times the largest measured size;
    the sizer then moves straight to the size with the best goodput, measured or predicted, instead of trying each
    doubling for ``min_steps`` steps. Before that, with one size measured, it explores a doubled batch while
    doubling keeps at least ``explore_min_efficiency`` of a row's worth, i.e. while the noise scale is well above
    the batch (0.75: the noise scale is at least twice the current batch). While the noise scale is infinite
    (no gradient signal measured yet) it grows one doubling at a time. It moves only when the other size's
    goodput is ``switch_margin`` higher (the medians of a shared machine's step times differ by a few percent
    from one window to the next, and chasing that noise would move the lr with it). Under data parallelism
    rank 0's sizer decides and the others follow (:meth:`follow`).
    """

    base_batch: int
    max_batch: int
    noise: NoiseScale = field(default_factory=NoiseScale)
    rows_per_s: dict[int, float] = field(default_factory=dict)  # median measured throughput per batch size
    current: int = 0
    explore_min_efficiency: float = 0.75
    lr_scaling: str = "adascale"
    changes: list[dict[str, Any]] = field(default_factory=list)
    recent_steps: int = 16
    min_steps: int = 8
    switch_margin: float = 0.05
    extrapolate: int = 4
    _recent: dict[int, deque[float]] = field(default_factory=dict, repr=False)
    _steps_at_current: int = field(default=0, repr=False)  # measured steps at the current size since it was chosen

    def __post_init__(self) -> None:
        self.current = self.current or self.base_batch

    def observe_throughput(self, batch: int, rows_per_s: float) -> None:
        """One step's rows/s; a size's figure is the median of its last ``recent_steps`` steps.

        The median, not a mean, because on a shared machine a step now and then stalls (another process, the
        allocator growing for a new size); the first step at a size is such a step by construction and is
        dropped.
        """
        recent = self._recent.get(batch)
        if recent is None:
            self._recent[batch] = deque(maxlen=self.recent_steps)
            return
        if batch == self.current:
            self._steps_at_current += 1
        recent.append(rows_per_s)
        self.rows_per_s[batch] = statistics.median(recent)

    def predicted_rows_per_s(self, batch: int) -> float | None:
        """Measured rows/s at ``batch``, or the fitted step-time line's (None: fewer than two sizes measured, a
        line that says bigger steps cost nothing, or ``batch`` beyond ``extrapolate`` x the largest measured)."""
        if batch in self.rows_per_s:
            return self.rows_per_s[batch]
        if len(self.rows_per_s) < 2 or batch > self.extrapolate * max(self.rows_per_s):
            return None
        sizes = list(self.rows_per_s)
        step_s = [size / self.rows_per_s[size] for size in sizes]
        mean_size, mean_step = statistics.fmean(sizes), statistics.fmean(step_s)
        spread = sum((size - mean_size) ** 2 for size in sizes)
        per_row = sum((size - mean_size) * (t - mean_step) for size, t in zip(sizes, step_s, strict=True)) / spread
        if per_row <= 0:  # noise, not a cost: no basis to predict from
            return None
        fixed = max(0.0, mean_step - per_row * mean_size)
        return batch / (fixed + per_row * batch)

    def goodput(self, batch: int) -> float | None:
        scale = self.noise.value
        rows_per_s = self.predicted_rows_per_s(batch)
        if scale is None or rows_per_s is None:
            return None
        return rows_per_s * efficiency(batch, self.base_batch, scale)

    def due(self) -> bool:
        """Whether to judge the batch size now: every ``min_steps`` measured steps at a size, once the noise scale
        and that size's throughput are known.

        It depends only on step counts and on the noise scale (from the all-reduced gradient), so every
        data-parallel rank agrees on it.
        """
        steps = self._steps_at_current
        known = self.noise.value is not None and self.current in self.rows_per_s
        return known and steps >= self.min_steps and steps % self.min_steps == 0

    def decide(self, step: int) -> int:
        """The batch size from the next step on: the one with the best goodput (measured or predicted), or, while
        only the current size is measured, the next size up to explore it.

        The current size stays until :meth:`due`.
        """
        scale = self.noise.value
        if scale is None or not self.due():
            return self.current
        # An infinite noise scale (|G|² measured <= 0) is no measurement of how large it is, only that the gradient
        # noise swamped the signal in the few samples so far: it rates every size's efficiency 1, and would send
        # the batch to the largest size the line predicts. Grow by one doubling at a time until it is finite.
        ceiling = self.max_batch if math.isfinite(scale) else min(self.max_batch, 2 * self.current)
        sizes, size = {self.current}, self.base_batch
        while size <= ceiling:  # the ladder base_batch * 2**k, in integers
            sizes.add(size)
            size *= 2
        known = {b: g for b in sizes if (g := self.goodput(b)) is not None}
        best = max(known, key=known.__getitem__)
        if known[best] < known[self.current] * (1 + self.switch_margin):  # within the medians' noise
            best = self.current
        bigger = self.current * 2
        # with nothing to predict from, explore upward while the noise scale says growing is cheap
        chosen = best
        if best == self.current and bigger <= ceiling and bigger not in known:
            gain = efficiency(bigger, self.base_batch, scale) / efficiency(self.current, self.base_batch, scale)
            if gain >= self.explore_min_efficiency:
                chosen = bigger
        if chosen != self.current:
            record = {
                "step": step,
                "from": self.current,
                "to": chosen,
                "noise_scale": scale,
                "goodput": {str(b): round(g, 1) for b, g in sorted(known.items())},
                "measured": sorted(self.rows_per_s),
            }
            self.changes.append(record)
            logger.info(
                "batch size %d -> %d (noise scale %.0f rows; goodput by size %s)",
                self.current,
                chosen,
                scale,
                record["goodput"],
            )
            self.current = chosen
            self._steps_at_current = 0
        return self.current

    def follow(self, chosen: int) -> None:
        """Adopt the size another process's sizer chose (data parallel: rank 0 decides for every rank)."""
        if chosen != self.current:
            self.current, self._steps_at_current = chosen, 0

    def lr_factor(self, optimizer: str) -> float:
        """LR multiplier for the current batch: the gain ``r`` for SGD, ``sqrt(r)`` for Adam-type optimizers.

        ``r`` is AdaScale's ``S·E(M)`` (``lr_scaling = "adascale"``) or the batch ratio ``S`` (``"rule"``).
        """
        gain = self.current / self.base_batch
        scale = self.noise.value
        if self.lr_scaling == "adascale" and scale is not None:
            gain *= efficiency(self.current, self.base_batch, scale)
        return gain if optimizer == "sgd" else math.sqrt(gain)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise": {"grad_sq": self.noise.grad_sq, "trace": self.noise.trace, "updates": self.noise.updates},
            "rows_per_s": {str(k): v for k, v in self.rows_per_s.items()},
            "current": self.current,
            "steps_at_current": self._steps_at_current,
            "changes": self.changes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.grad_sq = float(state["noise"]["grad_sq"])
        self.noise.trace = float(state["noise"]["trace"])
        self.noise.updates = int(state["noise"]["updates"])
        self.rows_per_s = {int(k): float(v) for k, v in state["rows_per_s"].items()}
        self.current = int(state["current"])
        self._steps_at_current = int(state.get("steps_at_current", 0))
        self.changes = list(state["changes"])
