"""The hot loop of the load generator: aiohttp on (uv)loop, in a process of its own.

It runs in its own process (``python -m kiln.bench.loadworker``, talking to its parent over two pipes) so it
shares no GIL with the caller (a bench script that also runs a model, say), and it is cheap per request: one
keep-alive connection pool, prebuilt bodies and headers, no encoding or decoding of JSON, and a few float and int
writes into preallocated arrays.

Open loop: requests go out on a precomputed schedule (Poisson arrivals) whether or not earlier ones have
answered; a request due while ``max_outstanding`` are in flight is not sent and counts as ``client-overload``.
Closed loop: ``clients`` coroutines each send, wait for the answer, and send again.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.bench.loadresults import CLIENT_ERROR, CLIENT_OVERLOAD, CONNECTION, NOT_SENT, TIMEOUT, Samples
from kiln.bench.loadtarget import Payload

if TYPE_CHECKING:
    import aiohttp

# A closed loop writes into arrays of this many entries at a time, growing them as it goes.
_CLOSED_LOOP_CHUNK = 4096


@dataclass(frozen=True)
class WorkerConfig:
    url: str  # the full infer URL
    payloads: tuple[Payload, ...]
    timeout_s: float
    warmup_requests: int


@dataclass(frozen=True)
class OpenLoopPlan:
    schedule_s: np.ndarray[Any, Any]  # ascending send times from the step's start
    span_s: float
    max_outstanding: int


@dataclass(frozen=True)
class ClosedLoopPlan:
    clients: int
    duration_s: float
    max_requests: int | None


Plan = OpenLoopPlan | ClosedLoopPlan


def main(argv: list[str] | None = None) -> None:
    """Entry point of the worker process: ``python -m kiln.bench.loadworker READ_FD WRITE_FD``."""
    read_fd, write_fd = (int(arg) for arg in (argv or sys.argv[1:]))
    worker_main(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


def worker_main(inbox: Connection, outbox: Connection) -> None:
    """Receive a :class:`WorkerConfig`, open a session, warm up, then run each plan received until ``None``.

    Messages sent back: ``("ready", None)``, ``("samples", Samples)`` per plan, or ``("error", traceback)``.
    """
    try:
        config: WorkerConfig = inbox.recv()
    except EOFError:
        return
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists (not on Windows)
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        session = loop.run_until_complete(_open_session(config))
        try:
            loop.run_until_complete(_warm_up(session, config))
            outbox.send(("ready", None))
            while (plan := inbox.recv()) is not None:
                outbox.send(("samples", loop.run_until_complete(run_plan(session, config, plan))))
        finally:
            loop.run_until_complete(session.close())
    except (EOFError, KeyboardInterrupt):
        pass  # the parent went away or was interrupted: nothing to report to
    except BaseException:
        outbox.send(("error", traceback.format_exc()))
    finally:
        loop.close()


async def _open_session(config: WorkerConfig) -> aiohttp.ClientSession:
    import aiohttp

    # limit=0: the plans bound the requests in flight themselves. keepalive_timeout stays under uvicorn's 5 s
    # default, so the client drops an idle connection before the server closes it under a request in transit.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=config.timeout_s),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


async def _warm_up(session: aiohttp.ClientSession, config: WorkerConfig) -> None:
    """A few requests, concurrently, so the first step does not pay for opening connections."""
    if config.warmup_requests < 1:
        return
    plan = OpenLoopPlan(np.zeros(config.warmup_requests), 0.0, config.warmup_requests)
    await run_plan(session, config, plan)


async def run_plan(session: aiohttp.ClientSession, config: WorkerConfig, plan: Plan) -> Samples:
    if isinstance(plan, OpenLoopPlan):
        return await _open_loop(session, config, plan)
    return await _closed_loop(session, config, plan)


class _Recorder:
    """Per-request figures in preallocated arrays; one ``send`` per request."""

    def __init__(self, session: aiohttp.ClientSession, config: WorkerConfig, size: int) -> None:
        import aiohttp

        self._post = session.post
        self._url = config.url
        self._payloads: Sequence[Payload] = config.payloads
        self._headers = [dict(p.headers) for p in config.payloads]
        self._connection_error = aiohttp.ClientConnectionError
        self._client_error = aiohttp.ClientError
        # NOTE: perf_counter, not loop.time(): uvloop's clock has millisecond steps and is cached per iteration.
        self._clock = time.perf_counter
        self.t0 = self._clock()
        self.scheduled = np.full(size, np.nan)
        self.sent = np.full(size, np.nan)
        self.done = np.full(size, np.nan)
        self.outcome = np.full(size, NOT_SENT, dtype=np.int32)
        self.outstanding = 0

    def now(self) -> float:
        return self._clock() - self.t0

    def grow(self, size: int) -> None:
        extra = size - len(self.outcome)
        self.scheduled = np.concatenate([self.scheduled, np.full(extra, np.nan)])
        self.sent = np.concatenate([self.sent, np.full(extra, np.nan)])
        self.done = np.concatenate([self.done, np.full(extra, np.nan)])
        self.outcome = np.concatenate([self.outcome, np.full(extra, NOT_SENT, dtype=np.int32)])

    async def send(self, i: int) -> None:
        k = i % len(self._payloads)
        self.sent[i] = self.now()
        try:
            async with self._post(self._url, data=self._payloads[k].body, headers=self._headers[k]) as response:
                await response.read()
                self.outcome[i] = response.status
        except TimeoutError:
            self.outcome[i] = TIMEOUT
        except self._connection_error:
            self.outcome[i] = CONNECTION
        except self._client_error:
            self.outcome[i] = CLIENT_ERROR
        except asyncio.CancelledError:
            self.outcome[i] = TIMEOUT
            raise
        finally:
            self.done[i] = self.now()

    def uncount(self, _task: asyncio.Task[None]) -> None:
        self.outstanding -= 1

    def samples(self, span_s: float, count: int | None = None) -> Samples:
        n = len(self.outcome) if count is None else count
        return Samples(self.scheduled[:n], self.sent[:n], self.done[:n], self.outcome[:n], span_s)


async def _open_loop(session: aiohttp.ClientSession, config: WorkerConfig, plan: OpenLoopPlan) -> Samples:
    schedule = plan.schedule_s
    rec = _Recorder(session, config, len(schedule))
    rec.scheduled[:] = schedule
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    i, n = 0, len(schedule)
    while i < n:
        # Fire every arrival that is due without yielding in between (a burst is a burst), then sleep to the next.
        now = rec.now()
        while i < n and schedule[i] <= now:
            if rec.outstanding >= plan.max_outstanding:
                rec.outcome[i] = CLIENT_OVERLOAD
            else:
                # Counted when created, not when send() starts: the cap must hold within one burst too.
                rec.outstanding += 1
                task = loop.create_task(rec.send(i))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                task.add_done_callback(rec.uncount)
            i += 1
        await asyncio.sleep(max(schedule[i] - rec.now(), 0.0) if i < n else 0.0)
    if in_flight:
        _, late = await asyncio.wait(in_flight, timeout=config.timeout_s + 1.0)
        for task in late:  # the per-request timeout should have ended these; never wait forever
            task.cancel()
        if late:
            await asyncio.wait(late)
    return rec.samples(plan.span_s)


async def _closed_loop(session: aiohttp.ClientSession, config: WorkerConfig, plan: ClosedLoopPlan) -> Samples:
    limit = plan.max_requests
    rec = _Recorder(session, config, min(limit or _CLOSED_LOOP_CHUNK, _CLOSED_LOOP_CHUNK))
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while rec.now() < plan.duration_s and (limit is None or next_index < limit):
            i = next_index
            next_index += 1
            if i >= len(rec.outcome):
                rec.grow(len(rec.outcome) + _CLOSED_LOOP_CHUNK)
            rec.scheduled[i] = rec.now()  # a closed-loop client is due as soon as its last answer came back
            await rec.send(i)

    await asyncio.gather(*(client() for _ in range(plan.clients)))
    span_s = plan.duration_s if limit is None or next_index < limit else rec.now()
    return rec.samples(min(span_s, rec.now()), next_index)


if __name__ == "__main__":
    main()
