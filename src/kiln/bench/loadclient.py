"""The load generator's client side: Poisson schedules, and :class:`LoadClient`, which drives a worker process.

The worker (:mod:`kiln.bench.loadworker`) runs the hot loop; this side plans each step, sends the plan down a
pipe, and turns the raw samples that come back into a :class:`~kiln.bench.loadresults.LoadStep`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from kiln.bench.loadresults import LoadStep, Samples, summarize
from kiln.bench.loadtarget import Payload, V2Target
from kiln.bench.loadworker import ClosedLoopPlan, OpenLoopPlan, Plan, WorkerConfig
from kiln.errors import ConfigError, KilnError

_WORKER_START_TIMEOUT_S = 120.0


def poisson_schedule(
    rate_rps: float, duration_s: float, max_requests: int | None = None, seed: int = 0
) -> np.ndarray[Any, Any]:
    """Send times (s from the step's start) of Poisson arrivals at ``rate_rps``, within ``duration_s`` and at most
    ``max_requests`` of them.

    Example:
        >>> len(poisson_schedule(100.0, 10.0, max_requests=50))
        50
    """
    if not (math.isfinite(rate_rps) and rate_rps > 0 and math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(
            f"a Poisson schedule needs a finite rate > 0 and duration > 0 s, not {rate_rps:g}/s for {duration_s:g} s"
        )
    rng = np.random.default_rng(seed)
    expected = rate_rps * duration_s
    size = int(expected + 6 * math.sqrt(expected) + 16)
    if max_requests is not None:  # never draw (or hold) more arrivals than the step may send
        size = min(size, max(max_requests, 1))
    times = np.cumsum(rng.exponential(1.0 / rate_rps, size=size))
    while times[-1] < duration_s and (max_requests is None or len(times) < max_requests):  # rare: costs nothing
        more = np.cumsum(rng.exponential(1.0 / rate_rps, size=len(times))) + times[-1]
        times = np.concatenate([times, more])
    times = times[times < duration_s]
    return times[:max_requests] if max_requests is not None else times


class LoadClient:
    """A load generator in a process of its own, holding a keep-alive connection pool between steps.

    Example:
        >>> target = V2Target("http://127.0.0.1:8000", "minilm")
        >>> with LoadClient(target, text_payloads(english_corpus(512))) as client:  # doctest: +SKIP
        ...     step = client.open_loop(40.0, duration_s=10)
        >>> step.p99_ms, step.achieved_rps, step.errors  # doctest: +SKIP
        (41.3, 39.6, {})
    """

    def __init__(
        self, target: V2Target, payloads: Sequence[Payload], *, timeout_s: float = 10.0, warmup_requests: int = 4
    ) -> None:
        if not payloads:
            raise ConfigError("a load client needs at least one prebuilt request; pass payloads")
        self.target = target
        if target.headers:  # the target's own headers (an API key) go with every request
            payloads = [dataclasses.replace(p, headers=p.headers + target.headers) for p in payloads]
        self._config = WorkerConfig(target.infer_url, tuple(payloads), timeout_s, warmup_requests)
        self._process: subprocess.Popen[bytes] | None = None
        self._outbox: Connection | None = None  # plans to the worker
        self._inbox: Connection | None = None  # samples from it

    def __enter__(self) -> LoadClient:
        # NOTE: a fresh interpreter, not multiprocessing: fork does not survive the ORT or torch thread pools the
        # caller may hold, and spawn re-imports the caller's __main__, which breaks scripts without a main guard.
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        src = str(Path(__file__).resolve().parents[2])  # so the worker imports this very kiln
        code = f"import sys; sys.path.insert(0, {src!r}); from kiln.bench.loadworker import main; main()"
        # One thread for numpy's BLAS: its idle pool would spin on the cores the server under test needs.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-c", code, str(from_parent), str(to_parent)], pass_fds=(from_parent, to_parent), env=env
        )
        os.close(from_parent)
        os.close(to_parent)
        self._outbox = Connection(to_child, readable=False)
        self._inbox = Connection(from_child, writable=False)
        self._outbox.send(self._config)
        self._receive("ready", _WORKER_START_TIMEOUT_S)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The generator process's id while it runs (for CPU accounting from ``/proc``)."""
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Stop the worker process (it finishes the step it is in, if any, for at most 10 s)."""
        if self._process is None or self._outbox is None or self._inbox is None:
            return
        with contextlib.suppress(OSError):  # the worker is gone already
            self._outbox.send(None)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            self._process.wait(timeout=5)
        self._outbox.close()
        self._inbox.close()
        self._process = self._outbox = self._inbox = None

    def open_loop(
        self,
        rate_rps: float,
        *,
        duration_s: float,
        max_requests: int | None = None,
        max_outstanding: int = 64,
        seed: int = 0,
    ) -> LoadStep:
        """One open-loop step: Poisson arrivals at ``rate_rps`` for ``duration_s`` (at most ``max_requests``)."""
        schedule = poisson_schedule(rate_rps, duration_s, max_requests, seed)
        span_s = duration_s if max_requests is None or len(schedule) < max_requests else float(schedule[-1])
        plan = OpenLoopPlan(schedule, span_s, max_outstanding)
        return summarize(self._run(plan, duration_s), mode="open", target_rps=rate_rps)

    def run_schedule(self, schedule_s: Sequence[float], *, max_outstanding: int = 64) -> LoadStep:
        """One open-loop step on a schedule of your own (send times in seconds from the start, ascending)."""
        schedule = np.asarray(schedule_s, dtype=np.float64)
        if schedule.size == 0 or np.any(np.diff(schedule) < 0) or schedule[0] < 0:
            raise ConfigError("a schedule must be a non-empty ascending list of send times >= 0 s")
        span_s = max(float(schedule[-1]), 1e-3)
        plan = OpenLoopPlan(schedule, span_s, max_outstanding)
        return summarize(self._run(plan, span_s), mode="open", target_rps=len(schedule) / span_s)

    def closed_loop(self, clients: int, *, duration_s: float, max_requests: int | None = None) -> LoadStep:
        """One closed-loop step: ``clients`` concurrent clients, each sending again as soon as it has its answer."""
        plan = ClosedLoopPlan(clients, duration_s, max_requests)
        return summarize(self._run(plan, duration_s), mode="closed", clients=clients)

    def _run(self, plan: Plan, duration_s: float) -> Samples:
        if self._outbox is None:
            raise KilnError("the load client is not running; use it as a context manager: `with LoadClient(...) as c`")
        self._outbox.send(plan)
        samples: Samples = self._receive("samples", duration_s + 2 * self._config.timeout_s + 30.0)
        return samples

    def _receive(self, expected: str, timeout_s: float) -> Any:
        assert self._inbox is not None
        if not self._inbox.poll(timeout_s):
            self.close()
            raise KilnError(f"the load generator process did not answer within {timeout_s:.0f} s; it was stopped")
        try:
            kind, value = self._inbox.recv()
        except EOFError as exc:
            code = self._process.wait(timeout=10) if self._process is not None else None
            self.close()
            raise KilnError(f"the load generator process died (exit code {code}); its error is above") from exc
        if kind == "error":
            self.close()
            raise KilnError(f"the load generator process failed:\n{value}")
        assert kind == expected, (kind, expected)
        return value
