"""Timing and fidelity: engines interleaved round-robin, so machine noise falls on all of them alike."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln._utils import median, percentile
from kiln.bench.engines import Candidate, Request
from kiln.fidelity import embedding_fidelity, output_fidelity, task_score

Array = np.ndarray[Any, Any]
CORPUS_PASSES = 3


def time_round_robin(
    candidates: Sequence[Candidate],
    requests: Sequence[Request],
    batch_size: int,
    *,
    warmup_runs: int,
    runs: int,
) -> dict[str, list[float]]:
    """Seconds per request for each candidate: ``warmup_runs`` untimed, then ``runs`` timed, A,B,C,A,B,C...

    Repetition ``r`` sends ``requests[r % len(requests)]`` to every engine, starting one engine later each time
    so no engine always runs right after the same neighbour.
    """
    for r in range(warmup_runs):
        for cand in candidates:
            cand.infer(requests[r % len(requests)], batch_size)
    seconds: dict[str, list[float]] = {cand.name: [] for cand in candidates}
    n = len(candidates)
    for r in range(runs):
        request = requests[r % len(requests)]
        for cand in [*candidates[r % n :], *candidates[: r % n]]:
            start = time.perf_counter()
            cand.infer(request, batch_size)
            seconds[cand.name].append(time.perf_counter() - start)
    return seconds


def latency_figures(seconds: Sequence[float], batch_size: int) -> tuple[float, float, float]:
    """``(p50_ms, p99_ms, rows_per_s)``; throughput is ``batch_size`` over the median latency."""
    p50 = median(seconds)
    return p50 * 1e3, percentile(seconds, 99) * 1e3, batch_size / p50


def corpus_passes(
    candidates: Sequence[Candidate], request: Request, batch_size: int, passes: int = CORPUS_PASSES
) -> tuple[dict[str, float], dict[str, Array]]:
    """Run the whole evaluation set through each engine ``passes`` times, interleaved.

    Returns the median seconds per pass and the outputs of the first pass (for fidelity).
    """
    seconds: dict[str, list[float]] = {cand.name: [] for cand in candidates}
    outputs: dict[str, Array] = {}
    for _ in range(passes):
        for cand in candidates:
            start = time.perf_counter()
            out = cand.infer(request, batch_size)
            seconds[cand.name].append(time.perf_counter() - start)
            outputs.setdefault(cand.name, out)
    return {name: median(values) for name, values in seconds.items()}, outputs


def fidelity_of(
    reference: Array, output: Array, *, task: str, embedding: bool, labels: Array | None
) -> dict[str, float]:
    """How an engine's outputs compare with the reference's on the same rows (the same numbers optimize uses).

    Embeddings: mean/worst cosine and top-10 neighbour overlap. Otherwise max abs/rel error, plus the task score
    (accuracy or R²) where labels are known.
    """
    if embedding:
        return embedding_fidelity(reference, output)
    figures = {}
    if labels is not None and task in ("classification", "regression"):
        figures.update(task_score(output, labels, task))
    figures.update(output_fidelity(reference, output))
    return figures
