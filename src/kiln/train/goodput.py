"""Goodput-aware batch size (Pollux's idea): grow the batch while it raises training progress per second.

Progress per second ("goodput") = throughput (rows/s, measured) x statistical efficiency (how much of a row's
work still counts at this batch size). The efficiency comes from the gradient noise scale
``B_noise = tr(Σ) / |G|²`` (McCandlish et al., 2018): with ``B_noise`` rows a batch already averages out most
gradient noise, and a batch of ``M`` rows relative to the starting ``M0`` is worth
``E(M) = (B_noise + M0) / (B_noise + M)`` of its rows. Bigger batches run faster per row on most hardware
(better-filled kernels) but count less per row; the sizer picks the size where the product peaks.

The noise scale is estimated from two gradient norms of the same step: the first micro-batch's (``b`` rows)
and the whole window's (``B`` rows), via the unbiased estimators

    |G|²   ≈ (B |G_B|² - b |G_b|²) / (B - b)
    tr(Σ)  ≈ (|G_b|² - |G_B|²) / (1/b - 1/B)

each smoothed with an exponential moving average before the ratio is taken (the ratio of noisy estimates is
badly biased; the ratio of smoothed ones is not).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

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


def efficiency(batch: int, base_batch: int, noise_scale: float) -> float:
    """Statistical efficiency of ``batch`` rows relative to ``base_batch``: (B_noise + M0) / (B_noise + M)."""
    if math.isinf(noise_scale):
        return 1.0
    return (noise_scale + base_batch) / (noise_scale + batch)


@dataclass
class GoodputSizer:
    """Chooses the batch size (``base_batch * 2**k`` up to ``max_batch``) with the highest measured goodput.

    Throughput is measured, never modelled: a size is tried (for one epoch) before it is judged, and the
    sizer only ever steps to the next power of two, so a bad guess costs one epoch. It explores a doubled batch
    only while doubling keeps at least ``explore_min_efficiency`` of a row's worth, i.e. while the noise scale is
    well above the batch (0.75: the noise scale is at least twice the current batch).
    """

    base_batch: int
    max_batch: int
    noise: NoiseScale = field(default_factory=NoiseScale)
    rows_per_s: dict[int, float] = field(default_factory=dict)  # EMA of measured throughput per batch size
    current: int = 0
    explore_min_efficiency: float = 0.75
    changes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.current = self.current or self.base_batch

    def observe_throughput(self, batch: int, rows_per_s: float) -> None:
        old = self.rows_per_s.get(batch)
        self.rows_per_s[batch] = rows_per_s if old is None else 0.8 * old + 0.2 * rows_per_s

    def goodput(self, batch: int) -> float | None:
        scale = self.noise.value
        if scale is None or batch not in self.rows_per_s:
            return None
        return self.rows_per_s[batch] * efficiency(batch, self.base_batch, scale)

    def decide(self, step: int) -> int:
        """The batch size for the next epoch: the best measured one, or the next size up to explore it."""
        scale = self.noise.value
        if scale is None or self.current not in self.rows_per_s:
            return self.current
        measured = {b: g for b in self.rows_per_s if (g := self.goodput(b)) is not None and b <= self.max_batch}
        best = max(measured, key=measured.__getitem__)
        bigger = self.current * 2
        # explore upward while the current size is the best so far and the noise scale says growing is cheap
        chosen = best
        if best == self.current and bigger <= self.max_batch and bigger not in self.rows_per_s:
            gain = efficiency(bigger, self.base_batch, scale) / efficiency(self.current, self.base_batch, scale)
            if gain >= self.explore_min_efficiency:
                chosen = bigger
        if chosen != self.current:
            record = {
                "step": step,
                "from": self.current,
                "to": chosen,
                "noise_scale": scale,
                "goodput": {str(b): round(g, 1) for b, g in measured.items()},
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
        return self.current

    def lr_factor(self, optimizer: str) -> float:
        """LR multiplier for the current batch: linear in the batch for SGD, square root for Adam-type."""
        ratio = self.current / self.base_batch
        return ratio if optimizer == "sgd" else math.sqrt(ratio)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise": {"grad_sq": self.noise.grad_sq, "trace": self.noise.trace, "updates": self.noise.updates},
            "rows_per_s": {str(k): v for k, v in self.rows_per_s.items()},
            "current": self.current,
            "changes": self.changes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.grad_sq = float(state["noise"]["grad_sq"])
        self.noise.trace = float(state["noise"]["trace"])
        self.noise.updates = int(state["noise"]["updates"])
        self.rows_per_s = {int(k): float(v) for k, v in state["rows_per_s"].items()}
        self.current = int(state["current"])
        self.changes = list(state["changes"])
