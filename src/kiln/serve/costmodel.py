"""What a batch costs on this hardware, learned online, and the cheapest way to cut a queue into batches.

A batch of ``rows`` rows padded to ``length`` tokens (1 for plain tensors) costs, to a good approximation,

    seconds = fixed + per_token * rows * length + per_token2 * rows * length**2

``fixed`` is the per-call overhead (Python, kernel launches, operator dispatch); the linear term is the dense
layers; the quadratic term is attention. On a GPU ``fixed`` dominates small batches, so merging requests pays a
lot. On a CPU core it is the dispatch of a few hundred operators (about 2.5-3 ms for FP32 MiniLM on one
thread, a third of a typical sentence's time), so merging sentences of similar length pays, while padding a short
sentence to a long one costs more than it saves. The batcher asks this model instead of assuming either.
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
        # the same as plain floats: predict() runs on the event loop, many times per dispatch under a backlog
        self._fixed, self._per_token, self._per_token2 = (float(c) for c in self._coef)
        self._lock = threading.Lock()
        self.fitted = False

    def observe(self, rows: int, length: int, seconds: float) -> None:
        """Record one measured batch (called from worker threads).

        The fit is redone at every sample while there are few (a fit on the first three alone, 1 and 2 rows of
        the smallest shape, can say that a call has no fixed cost at all), then every ``_REFIT_EVERY`` samples.
        """
        with self._lock:
            self._samples.append((rows, max(length, 1), seconds))
            self._since_fit += 1
            if self._since_fit >= _REFIT_EVERY or len(self._samples) <= _REFIT_EVERY:
                self._fit()

    def refit(self) -> None:
        """Fit every sample in the window now (the warm-up calls it, so serving starts from all it measured)."""
        with self._lock:
            self._fit()

    @property
    def samples(self) -> tuple[tuple[int, int, float], ...]:
        """The measured batches in the window: ``(rows, length, seconds)``, oldest first."""
        with self._lock:
            return tuple(self._samples)

    def _fit(self) -> None:
        self._since_fit = 0
        data = np.array(self._samples, dtype=np.float64)  # (N, 3): rows, length, seconds
        if len(data) < 3:
            return
        tokens = data[:, 0] * data[:, 1]
        design = np.stack([np.ones(len(data)), tokens, tokens * data[:, 1]], axis=1)
        # one or two lengths cannot separate the linear from the quadratic term
        terms = 3 if np.unique(data[:, 1]).size >= 3 else 2
        self._coef = _robust_fit(design[:, :terms], data[:, 2], size=3)
        self._fixed, self._per_token, self._per_token2 = (float(c) for c in self._coef)
        self.fitted = True

    @property
    def coefficients(self) -> tuple[float, float, float]:
        return self._fixed, self._per_token, self._per_token2

    def predict(self, rows: int, length: int) -> float:
        length = max(length, 1)
        return self._fixed + rows * length * (self._per_token + self._per_token2 * length)

    def may_share_batch(self, rows_a: int, length_a: int, rows_b: int, length_b: int) -> bool:
        """Whether two requests in one batch are predicted to cost less than apart.

        Together they save one call's fixed cost, and the shorter one's rows are padded to the longer one's length.
        The test is exact for a pair. In a bigger batch the shorter one is padded at least as far and still saves
        only its own call, so it would be cheaper alone: a request that fails the test against another never
        shares a least-cost batch with it.
        """
        if length_a > length_b:
            rows_a, length_a, rows_b, length_b = rows_b, length_b, rows_a, length_a
        short_rows, short, long = rows_a, max(length_a, 1), max(length_b, 1)
        padding = short_rows * (long - short) * (self._per_token + self._per_token2 * (long + short))
        return padding < self._fixed

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


def _robust_fit(design: np.ndarray, seconds: np.ndarray, size: int, rounds: int = 4) -> np.ndarray:
    """Non-negative fit of ``seconds`` on ``design`` in relative error, robust to batches that were preempted.

    Relative error, because a 1 ms batch mispredicted by 1 ms is as bad as a 100 ms one by 100 ms. Robust
    (Huber weights, iteratively reweighted), because a batch whose thread lost its core to another process
    takes several times its cost, and a few such samples in a plain least-squares fit turn a 2 ms fixed cost
    into 10 ms or into 0.
    """
    relative = 1.0 / np.maximum(seconds, 1e-6)
    robust = np.ones(len(seconds))
    coef = np.zeros(size)
    for _ in range(rounds):
        weights = relative * np.sqrt(robust)
        coef = _nonnegative_lstsq(design * weights[:, None], seconds * weights, size)
        residual = (design @ coef[: design.shape[1]] - seconds) * relative
        spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        threshold = 1.345 * max(spread, 0.02)  # a 2% relative error is never an outlier
        robust = np.minimum(1.0, threshold / np.maximum(np.abs(residual), 1e-12))
    return coef


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost has no negative part), zero-padded to ``size``.

    Clipping an unconstrained fit is not the same: when noise drives one term negative, the others absorb it, and
    clipping that term to zero leaves them wrong (a negative quadratic term inflates the linear one and can wipe
    out the fixed cost, so merging looks useless). With at most three terms, every subset is tried.
    """
    columns = design.shape[1]
    best, best_residual = np.zeros(size), float("inf")
    for mask in range(1, 2**columns):
        keep = [c for c in range(columns) if mask >> c & 1]
        coef, *_ = np.linalg.lstsq(design[:, keep], target, rcond=None)
        if (coef < 0).any():
            continue
        residual = float(np.sum((design[:, keep] @ coef - target) ** 2))
        if residual < best_residual:
            best, best_residual = np.zeros(size), residual
            best[keep] = coef
    return best
