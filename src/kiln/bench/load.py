"""``kiln bench --url``: open-loop (Poisson) and closed-loop load against any KServe V2 HTTP server.

Example:
    >>> settings = LoadSettings(rates=(20, 40, 80), duration_s=10)
    >>> report = load_test("http://127.0.0.1:8000", "minilm", settings=settings)  # doctest: +SKIP
    >>> rich.print(report.table())  # doctest: +SKIP
    >>> report.max_rate_within(p99_ms=200, max_error_rate=0.01)  # doctest: +SKIP
    80.0
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kiln._utils import package_versions
from kiln.bench.loadclient import LoadClient
from kiln.bench.loadresults import LoadReport, LoadStep
from kiln.bench.loadtarget import ModelMetadata, Payload, V2Target, probe, tensor_payloads, text_payloads
from kiln.config import check_field_types, settings_dict
from kiln.data import english_corpus
from kiln.errors import ConfigError

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
MAX_REQUESTS_PER_STEP = 10_000_000  # the worker keeps four float64 arrays of this length per step


@dataclass(frozen=True)
class LoadSettings:
    """How ``kiln bench --url`` loads a server (config file table ``[load]``, variables ``KILN_<FIELD>``).

    ``rates`` are Poisson arrival rates (requests/s), one step each; a non-empty ``closed_loop`` replaces them
    with steps of that many concurrent clients. Every step ends after ``duration_s`` or ``max_requests``
    requests, whichever comes first. ``concurrency`` caps the requests in flight (open loop): a request due over
    the cap is not sent and counts as a ``client-overload`` error, so the offered load never quietly drops.
    """

    rates: tuple[float, ...] = (10.0, 20.0, 40.0)
    duration_s: float = 10.0
    max_requests: int | None = None
    concurrency: int = 64
    closed_loop: tuple[int, ...] = ()
    binary: bool = False
    texts_per_request: int = 1
    rows_per_request: int = 1
    timeout_s: float = 10.0
    warmup_requests: int = 8
    cooldown_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        rates_ok = bool(self.rates) and all(map(_positive, self.rates))
        rules: list[tuple[str, object, bool, str]] = [
            ("rates", list(self.rates), rates_ok, "positive numbers, e.g. 10,20,40"),
            ("duration_s", self.duration_s, _positive(self.duration_s), "a number of seconds > 0"),
            ("max_requests", self.max_requests, self.max_requests is None or self.max_requests >= 1, "an integer >= 1"),
            ("concurrency", self.concurrency, self.concurrency >= 1, "an integer >= 1"),
            ("closed_loop", list(self.closed_loop), all(c >= 1 for c in self.closed_loop), "client counts >= 1"),
            ("texts_per_request", self.texts_per_request, self.texts_per_request >= 1, "an integer >= 1"),
            ("rows_per_request", self.rows_per_request, self.rows_per_request >= 1, "an integer >= 1"),
            ("timeout_s", self.timeout_s, _positive(self.timeout_s), "a number of seconds > 0"),
            ("warmup_requests", self.warmup_requests, self.warmup_requests >= 0, "an integer >= 0"),
            (
                "cooldown_s",
                self.cooldown_s,
                not self.cooldown_s or _positive(self.cooldown_s),
                "a number of seconds >= 0",
            ),
        ]
        for name, value, ok, rule in rules:
            if not ok:
                raise ConfigError(f"load setting {name} is {value}; it must be {rule}", setting=name, value=value)
        planned = min(max(self.rates) * self.duration_s, self.max_requests or math.inf)
        if not self.closed_loop and planned > MAX_REQUESTS_PER_STEP:
            raise ConfigError(
                f"a step at {max(self.rates):g} requests/s for {self.duration_s:g} s plans about {planned:,.0f} "
                f"requests; a step holds at most {MAX_REQUESTS_PER_STEP:,}: lower the rate or duration_s, or set "
                "max_requests",
                setting="rates",
                value=list(self.rates),
            )


def _positive(value: float) -> bool:
    """Finite and > 0. NOTE: NaN fails every comparison, so ``min(rates) > 0`` alone lets [10, nan] through."""
    return math.isfinite(value) and value > 0


def payloads_for(metadata: ModelMetadata, settings: LoadSettings) -> tuple[list[Payload], dict[str, Any]]:
    """Prebuilt requests for a model from its V2 metadata, and a description of what one request carries.

    Text models (one BYTES input) get ``texts_per_request`` paragraphs of real English each; tensor models get
    ``rows_per_request`` random rows that fit their signature.
    """
    outputs = [spec.name for spec in metadata.outputs] if settings.binary else []
    if metadata.is_text:
        texts = english_corpus()
        payloads = text_payloads(
            texts,
            input_name=metadata.inputs[0].name,
            texts_per_request=settings.texts_per_request,
            binary=settings.binary,
            outputs=outputs,
            column=len(metadata.inputs[0].shape) == 2,
        )
        words = sorted(len(t.split()) for t in texts[: len(payloads) * settings.texts_per_request])
        described = {
            "kind": "text",
            "texts_per_request": settings.texts_per_request,
            "median_words": words[len(words) // 2],
        }
    else:
        payloads = tensor_payloads(
            metadata.inputs,
            rows_per_request=settings.rows_per_request,
            binary=settings.binary,
            outputs=outputs,
            seed=settings.seed,
        )
        described = {"kind": "tensor", "rows_per_request": settings.rows_per_request}
    return payloads, described | {"binary": settings.binary, "distinct_requests": len(payloads)}


def load_test(
    url: str,
    model: str,
    *,
    version: str | None = None,
    settings: LoadSettings | None = None,
    label: str = "",
    report_dir: Path | None = None,
    progress: Progress | None = None,
    api_key: str | None = None,
) -> LoadReport:
    """Load a model on a KServe V2 HTTP server step by step and report each step.

    The model's inputs come from ``GET /v2/models/{model}``; one probe request checks the server answers before
    the load starts. With ``report_dir``, ``index.html`` (table + latency-vs-throughput plots) and ``load.json``
    are written there. ``api_key`` goes with every request as ``Authorization: Bearer <key>`` (it is written to
    neither).

    Raises:
        ConfigError: ``report_dir`` cannot be created.
        ModelNotFound: the server has no such model (or version).
        InvalidInput: the server refused the probe request.
        KilnError: the server cannot be reached, or failed the probe request.
    """
    settings = settings or LoadSettings()
    if report_dir is not None:  # before the load, not after it: a step's figures are not lost to a bad path
        try:
            Path(report_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the report to {report_dir} ({exc.strerror or exc}); choose another --report-dir",
                report_dir=str(report_dir),
            ) from exc
    target = V2Target.with_key(url, model, version, api_key)
    metadata = target.metadata()
    payloads, described = payloads_for(metadata, settings)
    outputs = probe(target, payloads[0], timeout_s=max(settings.timeout_s, 30.0))
    steps_planned: list[float] | list[int] = list(settings.closed_loop) or list(settings.rates)
    steps: list[LoadStep] = []
    with LoadClient(target, payloads, timeout_s=settings.timeout_s, warmup_requests=settings.warmup_requests) as client:
        for i, value in enumerate(steps_planned):
            what = f"{value} clients" if settings.closed_loop else f"{value:g} requests/s"
            if progress is not None:
                progress(f"step {i + 1}/{len(steps_planned)}: {what}", i / len(steps_planned))
            if i and settings.cooldown_s:
                time.sleep(settings.cooldown_s)
            if settings.closed_loop:
                step = client.closed_loop(
                    int(value), duration_s=settings.duration_s, max_requests=settings.max_requests
                )
            else:
                step = client.open_loop(
                    float(value),
                    duration_s=settings.duration_s,
                    max_requests=settings.max_requests,
                    max_outstanding=settings.concurrency,
                    seed=settings.seed + i,
                )
            logger.info("load %s: %s", what, step)
            steps.append(step)
    report = LoadReport(
        url=url,
        model=model,
        version=version,
        label=label,
        steps=steps,
        payload=described | {"outputs": outputs},
        hardware=_client_hardware(),
        versions=package_versions("kiln", "httptools", "numpy"),
        # the settings that steered this load: a closed loop sends at no rate and caps nothing in flight
        settings={
            k: v
            for k, v in settings_dict(settings).items()
            if not (settings.closed_loop and k in ("rates", "concurrency"))
        },
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if report_dir is not None:
        from kiln.bench.loadreport import write_load_html

        write_load_html([report], report_dir)
    if progress is not None:
        progress("done", 1.0)
    return report


def _client_hardware() -> dict[str, Any]:
    from kiln.runtime import probe as probe_hardware

    return copy.deepcopy(probe_hardware())  # probe() is cached: never hand out its dict


class OpenLoopClient(Protocol):
    """What :func:`search_max_rate` needs of a client: :meth:`LoadClient.open_loop`."""

    def open_loop(
        self, rate_rps: float, *, duration_s: float, max_requests: int | None, max_outstanding: int, seed: int
    ) -> LoadStep: ...


@dataclass
class RateSearch:
    """The highest Poisson rate that held the bar, and every step tried to find it."""

    rate_rps: float | None
    best: LoadStep | None
    steps: list[LoadStep] = field(default_factory=list)


def search_max_rate(
    client: OpenLoopClient,
    *,
    start_rps: float,
    p99_ms: float = 200.0,
    max_error_rate: float = 0.01,
    growth: float = 1.5,
    refine_steps: int = 3,
    duration_s: float = 8.0,
    max_outstanding: int = 64,
    cooldown_s: float = 1.0,
    min_rps: float = 0.5,
    max_rps: float = 100_000.0,
    confirm: int = 0,
    confirm_refine_steps: int = 0,
    progress: Callable[[LoadStep], None] | None = None,
) -> RateSearch:
    """Find the highest Poisson rate with P99 <= ``p99_ms`` and fewer than ``max_error_rate`` errors.

    Rates grow geometrically from ``start_rps`` (or shrink, if it already fails) until one step passes and the
    next fails, then ``refine_steps`` bisections (geometric midpoints) narrow the gap. No step goes past ``max_rps``:
    the growth ends with a step at ``max_rps`` itself. Each step is bounded by ``duration_s`` and by 1.5x the
    requests its rate expects in that time.

    Near saturation one short step's P99 swings a lot, so a lucky step can name a rate the server does not hold.
    With ``confirm`` = k, the best passing rate is run k more times and must pass a majority of its k + 1 steps;
    if it does not, the next lower passing rate is tried the same way. That fallback can land far below the rate
    that failed (a step of the growth phase): ``confirm_refine_steps`` more bisections then narrow the gap between
    the confirmed rate and the lowest one above it that failed, each midpoint held to the same majority of k + 1
    steps.
    """
    if growth <= 1.0 or start_rps <= 0:
        raise ConfigError(f"growth {growth:g} must be > 1 and start_rps {start_rps:g} > 0")
    if start_rps > max_rps:
        raise ConfigError(
            f"start_rps {start_rps:g} is above max_rps {max_rps:g}; the search never tries a rate past max_rps, "
            "so start at or below it",
            start_rps=start_rps,
            max_rps=max_rps,
        )
    steps: list[LoadStep] = []

    def passes(rate: float) -> bool:
        if steps and cooldown_s:
            time.sleep(cooldown_s)
        max_requests = int(rate * duration_s * 1.5) + 10
        step = client.open_loop(
            rate, duration_s=duration_s, max_requests=max_requests, max_outstanding=max_outstanding, seed=len(steps)
        )
        steps.append(step)
        if progress is not None:
            progress(step)
        return step.meets(p99_ms, max_error_rate)

    low: float | None = None
    high: float | None = None
    rate = start_rps
    if passes(rate):
        low = rate
        # NOTE: the last step up is max_rps itself, never a rate past it: a bracket above max_rps would send the
        # bisection (and so the result) past the limit. high stays None when max_rps itself passes.
        while rate < max_rps:
            rate = min(rate * growth, max_rps)
            if not passes(rate):
                high = rate
                break
            low = rate
    else:
        high = rate
        while (rate := rate / growth) >= min_rps and not passes(rate):
            high = rate
        low = rate if rate >= min_rps else None
    if low is not None and high is not None:
        for _ in range(refine_steps):
            middle = math.sqrt(low * high)
            if passes(middle):
                low = middle
            else:
                high = middle
    passed = sorted((s for s in steps if s.meets(p99_ms, max_error_rate)), key=lambda s: -s.rate_rps)
    for candidate in passed:
        wins = 1 + sum(passes(candidate.rate_rps) for _ in range(confirm))
        if 2 * wins > confirm + 1:
            return _refine_confirmed(candidate, steps, passes, p99_ms, max_error_rate, confirm, confirm_refine_steps)
    return RateSearch(None, None, steps)


def _refine_confirmed(
    best: LoadStep,
    steps: list[LoadStep],
    passes: Callable[[float], bool],
    p99_ms: float,
    max_error_rate: float,
    confirm: int,
    refine_steps: int,
) -> RateSearch:
    """Bisect between the confirmed ``best`` rate and the lowest rate above it that failed a step, each midpoint
    confirmed by a majority of ``confirm`` + 1 steps (stopping as soon as the majority is decided)."""
    needed = confirm // 2 + 1  # a majority of confirm + 1 steps
    for _ in range(refine_steps):
        above = [s.rate_rps for s in steps if s.rate_rps > best.rate_rps and not s.meets(p99_ms, max_error_rate)]
        if not above:
            break
        middle = math.sqrt(best.rate_rps * min(above))
        wins = losses = 0
        while wins < needed and losses < needed:
            if passes(middle):
                wins += 1
            else:
                losses += 1
        if wins >= needed:
            best = next(s for s in reversed(steps) if s.rate_rps == middle and s.meets(p99_ms, max_error_rate))
    return RateSearch(best.rate_rps, best, steps)
