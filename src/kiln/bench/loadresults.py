"""What a load test found: one :class:`LoadStep` per offered rate (or client count), and the curve they draw.

Latency is measured from each request's *scheduled* send time, not from when the client got round to sending it,
so a client or server that falls behind shows up in the tail instead of silently lowering the load
(coordinated omission). Percentiles are over successful responses; every other outcome is an error, counted by
HTTP status code (``"404"``, ``"503"``) or by kind (``"client-overload"``, ``"timeout"``, ``"connection"``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln._utils import atomic_write_text, percentile

if TYPE_CHECKING:
    from rich.table import Table

Array = np.ndarray[Any, Any]

# Outcomes that are not an HTTP status code; a request's outcome is a status (> 0) or one of these (< 0).
CLIENT_OVERLOAD = -1  # over the cap on outstanding requests: never sent
TIMEOUT = -2  # no complete answer within the request timeout
CONNECTION = -3  # refused, reset or closed by the server
CLIENT_ERROR = -4  # any other failure of the HTTP exchange (malformed response ...)
NOT_SENT = 0  # the step ended before this request was sent (closed loop bookkeeping only)
OUTCOME_KINDS = {
    CLIENT_OVERLOAD: "client-overload",
    TIMEOUT: "timeout",
    CONNECTION: "connection",
    CLIENT_ERROR: "client-error",
}
OK_STATUS = 200


# The share of its offered rate an open-loop step must answer at to stand for that rate. Answers trail arrivals by
# the latency, so a 10 s step answered within 200 ms reaches 0.98; far lower, the step was too short to tell.
KEPT_UP = 0.8


@dataclass
class Samples:
    """Raw per-request figures of one step, in seconds from the step's start; NaN where a request never got there.

    ``scheduled_s`` is when the request was due (open loop: its Poisson arrival; closed loop: when its client was
    free), ``sent_s`` when the client really sent it, ``done_s`` when its answer was complete.
    """

    scheduled_s: Array
    sent_s: Array
    done_s: Array
    outcome: Array  # int32: HTTP status, or one of the negative kinds above
    span_s: float  # the planned window: the step's duration, or the last arrival when the request count bounds it

    @property
    def latency_s(self) -> Array:
        """Completion minus *scheduled* time, per request (NaN when it never completed)."""
        latency: Array = self.done_s - self.scheduled_s
        return latency


@dataclass(frozen=True)
class LoadStep:
    """One step of a load test: what was offered, what came back, and how long it took.

    ``target_rps`` is the Poisson rate asked for (open loop) and ``clients`` the number of concurrent clients
    (closed loop); ``offered_rps`` is requests over the planned window; ``achieved_rps`` is successful responses
    over the window until the last answer. Latency figures are None when no request succeeded.
    """

    mode: str  # "open" | "closed"
    target_rps: float | None
    clients: int | None
    requests: int
    ok: int
    offered_rps: float
    achieved_rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    errors: dict[str, int]
    send_lag_p99_ms: float  # how late the client sent, P99: large values mean the client, not the server, lagged
    duration_s: float
    samples: Samples | None = field(default=None, compare=False, repr=False)

    @property
    def error_rate(self) -> float:
        return sum(self.errors.values()) / self.requests if self.requests else 0.0

    @property
    def rate_rps(self) -> float:
        """The rate this step stands for: the offered Poisson rate (open loop) or the achieved one (closed)."""
        return self.target_rps if self.target_rps is not None else self.achieved_rps

    def meets(self, p99_ms: float, max_error_rate: float) -> bool:
        """Whether this step held the bar: P99 <= ``p99_ms`` and an error rate below ``max_error_rate``, and, open
        loop, answers at ``KEPT_UP`` of the offered rate or more: a step of a few requests offered at 10⁹/s is
        a burst the server answered, not a rate it sustained."""
        kept_up = self.mode != "open" or self.achieved_rps >= KEPT_UP * self.offered_rps
        return (
            self.ok > 0
            and self.p99_ms is not None
            and self.p99_ms <= p99_ms
            and self.error_rate < max_error_rate
            and kept_up
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target_rps": self.target_rps,
            "clients": self.clients,
            "requests": self.requests,
            "ok": self.ok,
            "offered_rps": self.offered_rps,
            "achieved_rps": self.achieved_rps,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": dict(self.errors),
            "error_rate": self.error_rate,
            "send_lag_p99_ms": self.send_lag_p99_ms,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadStep:
        known = {k: v for k, v in data.items() if k != "error_rate"}
        return cls(**known)


def summarize(samples: Samples, *, mode: str, target_rps: float | None = None, clients: int | None = None) -> LoadStep:
    """Turn one step's raw samples into its figures."""
    outcome = samples.outcome
    sent = outcome != NOT_SENT
    requests = int(np.count_nonzero(sent))
    ok_mask = outcome == OK_STATUS
    errors: dict[str, int] = {}
    for code, count in zip(*np.unique(outcome[sent & ~ok_mask], return_counts=True), strict=True):
        errors[OUTCOME_KINDS.get(int(code), str(int(code)))] = int(count)
    latency_ms = [float(v) for v in samples.latency_s[ok_mask] * 1e3]
    lag_ms = samples.sent_s - samples.scheduled_s
    lag_ms = lag_ms[~np.isnan(lag_ms)] * 1e3
    finished = samples.done_s[~np.isnan(samples.done_s)]
    window_s = max(samples.span_s, float(finished.max()) if finished.size else 0.0, 1e-9)
    ok = int(np.count_nonzero(ok_mask))

    def pct(q: float) -> float | None:
        return percentile(latency_ms, q) if latency_ms else None

    return LoadStep(
        mode=mode,
        target_rps=target_rps,
        clients=clients,
        requests=requests,
        ok=ok,
        offered_rps=requests / max(samples.span_s, 1e-9),
        achieved_rps=ok / window_s,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        max_ms=max(latency_ms) if latency_ms else None,
        errors=errors,
        send_lag_p99_ms=percentile([float(v) for v in lag_ms], 99) if lag_ms.size else 0.0,
        duration_s=window_s,
        samples=samples,
    )


@dataclass
class LoadReport:
    """A load test against one V2 server and model: its steps, plus the context to trust them.

    Example:
        >>> report = load_test("http://127.0.0.1:8000", "minilm")  # doctest: +SKIP
        >>> report.max_rate_within(p99_ms=200, max_error_rate=0.01)  # doctest: +SKIP
        118.0
    """

    url: str
    model: str
    steps: list[LoadStep]
    label: str = ""
    version: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)  # what one request carries (kind, rows, binary ...)
    hardware: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def name(self) -> str:
        return self.label or f"{self.model} @ {self.url}"

    def best_step_within(self, p99_ms: float = 200.0, max_error_rate: float = 0.01) -> LoadStep | None:
        """The step with the highest rate that held P99 <= ``p99_ms`` with fewer than ``max_error_rate`` errors,
        every step at a lower rate holding it too: a step that passes above one that failed is luck, not capacity.
        """
        held = None
        for step in sorted(self.steps, key=lambda step: step.rate_rps):
            if not step.meets(p99_ms, max_error_rate):
                break
            held = step
        return held

    def max_rate_within(self, p99_ms: float = 200.0, max_error_rate: float = 0.01) -> float | None:
        """The highest rate (requests/s) held with P99 <= ``p99_ms`` and fewer than ``max_error_rate`` errors, at
        it and at every lower rate tried (:meth:`best_step_within`).

        Open loop: the highest *offered* Poisson rate that met the bar; closed loop: the highest achieved rate.
        None when no step met it.

        Example:
            >>> report.max_rate_within(p99_ms=200, max_error_rate=0.01)  # doctest: +SKIP
            80.0
        """
        best = self.best_step_within(p99_ms, max_error_rate)
        return None if best is None else best.rate_rps

    def curve(self) -> list[tuple[float, float | None, float | None, float | None]]:
        """The latency-vs-throughput curve: ``(achieved rps, P50, P90, P99 ms)`` per step, by rate."""
        ordered = sorted(self.steps, key=lambda s: (s.target_rps or 0.0, s.clients or 0, s.achieved_rps))
        return [(s.achieved_rps, s.p50_ms, s.p90_ms, s.p99_ms) for s in ordered]

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "version": self.version,
            "label": self.label,
            "created_at": self.created_at,
            "payload": self.payload,
            "steps": [step.to_dict() for step in self.steps],
            "hardware": self.hardware,
            "versions": self.versions,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        return cls(
            url=str(data["url"]),
            model=str(data["model"]),
            version=data.get("version"),
            label=str(data.get("label", "")),
            created_at=str(data.get("created_at", "")),
            payload=dict(data.get("payload", {})),
            steps=[LoadStep.from_dict(step) for step in data["steps"]],
            hardware=dict(data.get("hardware", {})),
            versions=dict(data.get("versions", {})),
            settings=dict(data.get("settings", {})),
        )

    def write_json(self, path: Path) -> Path:
        """Write the report as JSON (atomically) and return the path."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def table(self) -> Table:
        """A rich table: one row per step (rate, throughput, P50/P90/P99, the client's send lag, errors)."""
        from rich.table import Table

        table = Table(title=f"load: {self.name}")
        for name in STEP_COLUMNS:
            table.add_column(name, justify="right" if name != "errors" else "left")
        for step in self.steps:
            table.add_row(*step_cells(step))
        payload = ", ".join(f"{k} {v}" for k, v in self.payload.items() if k not in ("outputs", "distinct_requests"))
        table.caption = f"latency from scheduled send time; {payload}" if payload else None
        return table


STEP_COLUMNS = ("rate", "requests", "ok/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "send lag p99 ms", "errors")
"""The columns of a load step, in the order ``step_cells`` fills them (rich table and HTML report alike).

``send lag``: how late the client sent its requests against their Poisson schedule (P99; "-" in closed loop,
which has no schedule). Latency counts from the scheduled time, so a client that lags shows up in both; when the
lag is a large part of the P99, the client's machine, not the server, set the figure.
"""


def step_cells(step: LoadStep) -> list[str]:
    """The cells of one table row, shared by the rich table and the HTML page."""
    rate = (
        f"{step.target_rps:,.1f}/s"
        if step.target_rps is not None
        else f"{step.clients} client{'' if step.clients == 1 else 's'}"
    )
    errors = ", ".join(f"{kind} ×{count}" for kind, count in sorted(step.errors.items())) or "-"
    if step.errors:
        errors = f"{step.error_rate:.1%}: {errors}"
    return [
        rate,
        str(step.requests),
        f"{step.achieved_rps:,.1f}",
        *(_ms(value) for value in (step.p50_ms, step.p90_ms, step.p99_ms, step.max_ms)),
        _ms(step.send_lag_p99_ms) if step.target_rps is not None else "-",
        errors,
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.1f}"
