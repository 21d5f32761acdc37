"""What a batch costs on this hardware, learned online, and the cheapest way to cut a queue into batches.

A batch of ``rows`` rows padded to ``length`` tokens (1 for plain tensors) costs, to a good approximation,

    seconds = fixed + per_token * rows * length + per_token2 * rows * length**2

``fixed`` is the per-call overhead (Python, kernel launches, thread wake-ups); the linear term is the dense
layers; the quadratic term is attention. On a GPU ``fixed`` dominates small batches, so merging requests pays a
lot; on two CPU cores it is tiny and padding is what costs, so merging rows of different lengths can *hurt*.
The batcher asks this model instead of assuming either.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np

_WINDOW = 512
_REFIT_EVERY = 16


class BatchCostModel:
    """Least-squares fit of batch seconds on ``(1, rows*length, rows*length**2)``, over a sliding window."""

    def __init__(self) -> None:
        self._samples: deque[tuple[int, int, float]] = deque(maxlen=_WINDOW)
        self._since_fit = 0
        self._coef = np.array([1e-3, 1e-5, 0.0])  # a harmless prior until the warm-up has measured
        self._lock = threading.Lock()
        self.fitted = False

    def observe(self, rows: int, length: int, seconds: float) -> None:
        """Record one measured batch (called from worker threads)."""
        with self._lock:
            self._samples.append((rows, max(length, 1), seconds))
            self._since_fit += 1
            if self._since_fit >= _REFIT_EVERY or not self.fitted:
                self._fit()

    def _fit(self) -> None:
        self._since_fit = 0
        data = np.array(self._samples, dtype=np.float64)  # (N, 3): rows, length, seconds
        if len(data) < 3:
            return
        tokens = data[:, 0] * data[:, 1]
        design = np.stack([np.ones(len(data)), tokens, tokens * data[:, 1]], axis=1)
        # Relative error matters (a 1 ms batch mispredicted by 1 ms is as bad as a 100 ms one by 100 ms).
        weights = 1.0 / np.maximum(data[:, 2], 1e-5)
        coef, *_ = np.linalg.lstsq(design * weights[:, None], data[:, 2] * weights, rcond=None)
        if np.unique(data[:, 1]).size < 3:
            coef[2] = 0.0  # one or two lengths cannot separate the linear from the quadratic term
            coef[:2], *_ = np.linalg.lstsq(design[:, :2] * weights[:, None], data[:, 2] * weights, rcond=None)
        self._coef = np.maximum(coef, 0.0)
        self.fitted = True

    @property
    def coefficients(self) -> tuple[float, float, float]:
        fixed, per_token, per_token2 = (float(c) for c in self._coef)
        return fixed, per_token, per_token2

    def predict(self, rows: int, length: int) -> float:
        fixed, per_token, per_token2 = self.coefficients
        tokens = rows * max(length, 1)
        return fixed + per_token * tokens + per_token2 * tokens * max(length, 1)

    def batching_gain(self, max_rows: int, length: int) -> float:
        """How much cheaper a row is in a full batch than alone (1.0: batching does not pay at all)."""
        alone = self.predict(1, length)
        batched = self.predict(max_rows, length) / max_rows
        return alone / batched if batched > 0 else 1.0

    def plan(self, lengths: Sequence[int], rows: Sequence[int], max_rows: int) -> list[list[int]]:
        """Cut requests into batches of least predicted total time.

        ``lengths[i]``/``rows[i]`` describe request ``i``; returns lists of request indices, each list one
        batch (at most ``max_rows`` rows unless a single request is larger), cheapest batch first. Requests are
        sorted by length and cut into contiguous runs by dynamic programming: O(n^2) for n requests.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        n = len(order)
        fixed, per_token, per_token2 = self.coefficients  # inlined below: this runs on the event loop
        best = [0.0] + [float("inf")] * n  # best[j]: cheapest cover of the first j requests in length order
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            total_rows = 0
            for i in range(j, 0, -1):  # the last batch is order[i-1 : j]
                total_rows += rows[order[i - 1]]
                if total_rows > max_rows and i < j:
                    break
                length = max(lengths[order[j - 1]], 1)
                tokens = total_rows * length
                cost = best[i - 1] + fixed + tokens * (per_token + per_token2 * length)
                if cost < best[j]:
                    best[j], cut[j] = cost, i - 1
        batches: list[list[int]] = []
        j = n
        while j > 0:
            batches.append(order[cut[j] : j])
            j = cut[j]
        batches.sort(key=lambda b: self.predict(sum(rows[i] for i in b), max(lengths[i] for i in b)))
        return batches
