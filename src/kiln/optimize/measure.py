"""Measure a candidate the way the search judges it: fidelity to its parent, speed on this machine, size.

Speed is always measured *against the parent in the same run*, alternating parent and candidate, so a noisy,
shared machine moves both and the ratio stays meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln import fidelity
from kiln._utils import median, percentile
from kiln.artifact import Artifact
from kiln.data import EvalSet
from kiln.runtime import Engine, OrtEngine, TextEncoder, tokenizer_for

Array = np.ndarray[Any, Any]


class Workload:
    """Held-out inputs plus how to push them through an engine at a given batch size.

    Text models are encoded with the tokenizer and length-sorted batches inside the timed region: that is the
    cost a user pays per sentence.
    """

    def __init__(self, artifact: Artifact, data: EvalSet) -> None:
        self.task = artifact.manifest.task
        self.data = data
        # The first float output (embedding, probabilities, logits) carries the fidelity; labels follow from it.
        outputs = artifact.manifest.signature.outputs
        floats = [o.name for o in outputs if o.dtype in ("FP32", "FP16", "FP64")]
        self.output = floats[0] if floats else outputs[0].name
        # A classifier's own label output (scikit-learn's "label") scores the task when the held-out labels are of
        # its kind (classes 1, 2, 3 or "setosa" ...); text models are scored on their embeddings, never on labels
        text = artifact.manifest.preprocessing.get("kind") == "text"
        self.label_output = None if text else fidelity.label_output(outputs, data.labels, self.task, scored=self.output)
        if self.task == "classification" and data.labels is not None:
            fidelity.check_label_shape(data.labels)  # on every row given, not the rows the guard scores
        classes = artifact.manifest.postprocessing.get("classes")  # scikit-learn classifiers exported since 2026-12
        if self.label_output and data.labels is not None and isinstance(classes, list):
            fidelity.check_label_classes(data.labels, classes, self.label_output)
        self.tokenizer = tokenizer_for(artifact)

    @property
    def rows(self) -> int:
        return self.data.rows

    def run(self, engine: Engine, batch_size: int, rows: int | None = None) -> Array:
        """Outputs for the first ``rows`` held-out rows, computed in batches of ``batch_size``."""
        return self.predict(engine, batch_size, rows)[self.output]

    def predict(self, engine: Engine, batch_size: int, rows: int | None = None) -> dict[str, Array]:
        """The fidelity output (and the label output, when the task is scored on it) for the first ``rows``."""
        subset = self.data if rows is None else self.data.take(slice(0, rows))
        if self.tokenizer is not None:
            assert subset.texts is not None
            return {self.output: TextEncoder(engine, self.tokenizer, self.output).encode(subset.texts, batch_size)}
        assert subset.feeds is not None
        names = [self.output] + ([self.label_output] if self.label_output else [])
        parts: dict[str, list[Array]] = {name: [] for name in names}
        for start in range(0, subset.rows, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in subset.feeds.items()}
            result = engine.run(batch)
            for name in names:
                parts[name].append(result[name])
        return {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}

    def fidelity(self, reference: dict[str, Array], candidate: dict[str, Array]) -> dict[str, float]:
        """Fidelity figures of two ``predict`` results; ``score`` is the one the guard compares (cosine or task
        accuracy/R²)."""
        ref, cand = reference[self.output], candidate[self.output]
        if self.task == "embedding":
            figures = fidelity.embedding_fidelity(ref, cand)
            return figures | {"score": figures["mean_cosine"]}
        figures = fidelity.output_fidelity(ref, cand)
        if self.data.labels is not None and self.task in ("classification", "regression"):
            scored = candidate[self.label_output] if self.label_output else cand
            scores = fidelity.task_score(scored, self.data.labels, self.task)
            figures |= scores | {"score": next(iter(scores.values()))}
        else:
            figures |= {"score": float(np.mean(fidelity.cosine_rows(ref, cand)))}
        return figures


@dataclass
class Speed:
    """Per batch size: seconds per pass over the workload slice (one entry per repeat), rows per pass."""

    seconds: dict[int, list[float]] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)

    def throughput(self, batch_size: int) -> float:
        return self.rows[batch_size] / median(self.seconds[batch_size])

    def latency_ms(self, batch_size: int) -> float:
        """Median time per batch of ``batch_size`` rows, in milliseconds."""
        batches = -(-self.rows[batch_size] // batch_size)
        return 1000 * median(self.seconds[batch_size]) / batches

    def p99_ms(self, batch_size: int) -> float:
        batches = -(-self.rows[batch_size] // batch_size)
        return 1000 * percentile(self.seconds[batch_size], 99) / batches

    def to_dict(self) -> dict[str, Any]:
        return {
            str(bs): {
                "rows_per_s": self.throughput(bs),
                "batch_latency_ms": self.latency_ms(bs),
                "p99_batch_latency_ms": self.p99_ms(bs),
                "repeats": len(self.seconds[bs]),
            }
            for bs in self.seconds
        }


def paired_ratios(candidate: Speed, parent: Speed, batch_size: int) -> list[float]:
    """Candidate/parent throughput ratio of each repeat (both measured in the same round)."""
    return [p / c for c, p in zip(candidate.seconds[batch_size], parent.seconds[batch_size], strict=True)]


def rows_for(batch_size: int, available: int) -> int:
    """Enough rows for a stable figure without spending minutes at batch 1."""
    return min(available, max(16 * batch_size, 32) if batch_size < 8 else available)


MIN_SAMPLE_S = 0.05  # a timed sample shorter than this is mostly timer and scheduler noise


def compare_speed(
    engines: dict[str, Engine],
    workload: Workload,
    batch_sizes: tuple[int, ...],
    repeats: int,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Speed]:
    """Time every engine at every batch size, interleaved (A, B, A, B ...) after a warm-up pass each.

    Small models finish a pass in microseconds; like ``timeit``'s autorange, each sample then loops the pass
    until it lasts at least ``MIN_SAMPLE_S``, so the figure measures the model rather than the timer.
    """
    speeds = {name: Speed() for name in engines}
    for bs in batch_sizes:
        rows = rows_for(bs, workload.rows)
        loops = 1
        for engine in engines.values():
            start = time.perf_counter()
            workload.run(engine, bs, rows)  # warm-up: first runs allocate and pick kernels
            elapsed = time.perf_counter() - start
            loops = max(loops, min(1000, int(MIN_SAMPLE_S / max(elapsed, 1e-6)) + 1))
        for _ in range(repeats):
            for name, engine in engines.items():
                start = time.perf_counter()
                for _loop in range(loops):
                    workload.run(engine, bs, rows)
                speeds[name].seconds.setdefault(bs, []).append((time.perf_counter() - start) / loops)
                speeds[name].rows[bs] = rows
            if on_step:
                on_step()
    return speeds


def open_engine(path: Path, name: str) -> OrtEngine:
    return OrtEngine(path, name=name)
