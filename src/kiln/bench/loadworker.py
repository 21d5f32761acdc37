"""The hot loop of the load generator: raw HTTP/1.1 keep-alive connections on (uv)loop, in a process of its own.

It runs in its own process (``python -m kiln.bench.loadworker``, talking to its parent over two pipes) so it
shares no GIL with the caller (a bench script that also runs a model, say). It is cheap per request, because on a
small machine its CPU is taken from the server it measures: every request's bytes (request line, headers, body)
are built once, before the load; sending one is a single write on an idle keep-alive connection; httptools (the
C parser uvicorn uses) reads the answer, of which only the status is kept; the open loop makes no task or future
per request, and the figures go into preallocated arrays. (aiohttp, which this replaced, cost about twice the CPU per
request; ``bench/serve_cpu.py`` measures it.)

Open loop: requests go out on a precomputed schedule (Poisson arrivals) whether or not earlier ones have
answered; a request due while ``max_outstanding`` are in flight is not sent and counts as ``client-overload``.
Closed loop: ``clients`` coroutines each send, wait for the answer, and send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast
from urllib.parse import SplitResult, urlsplit

import httptools
import numpy as np

from kiln.bench.loadresults import CLIENT_ERROR, CLIENT_OVERLOAD, CONNECTION, NOT_SENT, TIMEOUT, Samples
from kiln.bench.loadtarget import Payload

# A closed loop writes into arrays of this many entries at a time, growing them as it goes.
_CLOSED_LOOP_CHUNK = 4096
# A connection idle this long is closed rather than reused: under uvicorn's 5 s keep-alive, so the client drops it
# before the server can close it under a request in transit.
_KEEPALIVE_S = 3.0


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
    """Receive a :class:`WorkerConfig`, warm up a connection pool, then run each plan received until ``None``.

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
        pool = _Pool(config, loop)
        try:
            loop.run_until_complete(_warm_up(pool, config))
            outbox.send(("ready", None))
            while (plan := inbox.recv()) is not None:
                outbox.send(("samples", loop.run_until_complete(run_plan(pool, config, plan))))
        finally:
            pool.close()
            loop.run_until_complete(asyncio.sleep(0))  # let the transports see their close
    except (EOFError, KeyboardInterrupt):
        pass  # the parent went away or was interrupted: nothing to report to
    except BaseException:
        outbox.send(("error", traceback.format_exc()))
    finally:
        loop.close()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time; httptools parses the answers."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.request = -1  # the index of the request awaiting its answer; -1 while idle
        self.idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def send(self, i: int, data: bytes, timeout_s: float) -> None:
        assert self.transport is not None
        self.request = i
        self._timer = self._pool.loop.call_later(timeout_s, self.time_out)
        self.transport.write(data)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not registered as one

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:  # a malformed answer (an upgrade included): this connection is done
            self._finish(CLIENT_ERROR, reuse=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.request >= 0:
            self._finish(CONNECTION, reuse=False)
        else:
            self._pool.forget(self)

    # httptools callback
    def on_message_complete(self) -> None:
        transport = self.transport
        reuse = (
            self._parser.should_keep_alive()
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0  # an early answer (413) with our body still unsent
        )
        self._finish(self._parser.get_status_code(), reuse=reuse)

    def time_out(self) -> None:
        self._timer = None
        self._finish(TIMEOUT, reuse=False)

    def _finish(self, outcome: int, *, reuse: bool) -> None:
        i, self.request = self.request, -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reuse:
            self.idle_since = self._pool.clock()
            self._pool.idle.append(self)
        else:
            self.close()
        if i >= 0:  # not an answer nobody asked for
            self._pool.done(i, outcome)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self._pool.forget(self)


class _Pool:
    """Keep-alive connections to one URL; ``send(i)`` writes request ``i``'s prebuilt bytes on an idle one (a new
    connection when none is idle) and, when it is over, calls ``done(i, outcome)``: the HTTP status, or one of
    :data:`TIMEOUT`, :data:`CONNECTION`, :data:`CLIENT_ERROR`. No task or future is made per request."""

    def __init__(self, config: WorkerConfig, loop: asyncio.AbstractEventLoop) -> None:
        url = urlsplit(config.url)
        assert url.hostname, "V2Target refuses a URL without an http(s) scheme and a host"
        self.loop = loop
        self.clock = self.loop.time
        self.done: Callable[[int, int], None] = _unexpected  # set by each plan's recorder
        self.idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._host, self._port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._timeout_s = config.timeout_s
        self._requests = [_request_bytes(url, p) for p in config.payloads]

    def send(self, i: int) -> None:
        data = self._requests[i % len(self._requests)]
        while self.idle:
            connection = self.idle.pop()
            if connection.transport is not None and self.clock() - connection.idle_since < _KEEPALIVE_S:
                connection.send(i, data, self._timeout_s)
                return
            connection.close()
        task = self.loop.create_task(self._connect_and_send(i, data))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect_and_send(self, i: int, data: bytes) -> None:
        began = self.clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl
                )
        except (TimeoutError, asyncio.CancelledError):  # cancelled: the plan abandoned it
            self.done(i, TIMEOUT)
            return
        except OSError:  # refused, unreachable, reset, a TLS failure
            self.done(i, CONNECTION)
            return
        self._all.add(connection)
        connection.send(i, data, max(self._timeout_s - (self.clock() - began), 0.0))

    def forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)

    def abandon(self) -> None:
        """End every request still waiting as :data:`TIMEOUT` (their connections close); idle ones stay open."""
        for task in list(self._connecting):
            task.cancel()
        for connection in list(self._all):
            if connection.request >= 0:
                connection.time_out()

    def close(self) -> None:
        """Abandon what is outstanding and close every connection."""
        self.abandon()
        for connection in list(self._all):
            connection.close()


def _unexpected(i: int, outcome: int) -> None:
    raise AssertionError(f"request {i} ended ({outcome}) outside a plan")


def _request_bytes(url: SplitResult, payload: Payload) -> bytes:
    """The whole request, written once: request line, headers (``Host`` and ``Content-Length`` added), body."""
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    host = url.netloc.rpartition("@")[2]
    names = {name.lower() for name, _ in payload.headers}
    headers = [("Host", host)] if "host" not in names else []
    headers += list(payload.headers)
    if "content-length" not in names:
        headers.append(("Content-Length", str(len(payload.body))))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + payload.body


async def _warm_up(pool: _Pool, config: WorkerConfig) -> None:
    """A few requests, concurrently, so the first step does not pay for opening connections."""
    if config.warmup_requests < 1:
        return
    plan = OpenLoopPlan(np.zeros(config.warmup_requests), 0.0, config.warmup_requests)
    await run_plan(pool, config, plan)


async def run_plan(pool: _Pool, config: WorkerConfig, plan: Plan) -> Samples:
    if isinstance(plan, OpenLoopPlan):
        return await _open_loop(pool, config, plan)
    return await _closed_loop(pool, config, plan)


class _Recorder:
    """Per-request figures in preallocated arrays, written by the pool's ``done`` callback."""

    def __init__(self, size: int) -> None:
        # NOTE: perf_counter, not loop.time(): uvloop's clock has millisecond steps and is cached per iteration.
        self._clock = time.perf_counter
        self.t0 = self._clock()
        self.scheduled = np.full(size, np.nan)
        self.sent = np.full(size, np.nan)
        self.done = np.full(size, np.nan)
        self.outcome = np.full(size, NOT_SENT, dtype=np.int32)
        self.outstanding = 0
        self.waiters: dict[int, asyncio.Future[None]] = {}  # closed loop: the client waiting on request i
        self.all_done: asyncio.Future[None] | None = None  # open loop's end: set when nothing is outstanding

    def now(self) -> float:
        return self._clock() - self.t0

    def grow(self, size: int) -> None:
        extra = size - len(self.outcome)
        self.scheduled = np.concatenate([self.scheduled, np.full(extra, np.nan)])
        self.sent = np.concatenate([self.sent, np.full(extra, np.nan)])
        self.done = np.concatenate([self.done, np.full(extra, np.nan)])
        self.outcome = np.concatenate([self.outcome, np.full(extra, NOT_SENT, dtype=np.int32)])

    def finish(self, i: int, outcome: int) -> None:
        self.done[i] = self.now()
        self.outcome[i] = outcome
        self.outstanding -= 1
        waiter = self.waiters.pop(i, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.outstanding and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)

    def samples(self, span_s: float, count: int | None = None) -> Samples:
        n = len(self.outcome) if count is None else count
        return Samples(self.scheduled[:n], self.sent[:n], self.done[:n], self.outcome[:n], span_s)


async def _open_loop(pool: _Pool, config: WorkerConfig, plan: OpenLoopPlan) -> Samples:
    schedule = plan.schedule_s
    rec = _Recorder(len(schedule))
    rec.scheduled[:] = schedule
    pool.done = rec.finish
    i, n = 0, len(schedule)
    try:
        while i < n:
            # Fire every arrival that is due without yielding in between (a burst is a burst), then sleep to the next.
            now = rec.now()
            while i < n and schedule[i] <= now:
                if rec.outstanding >= plan.max_outstanding:
                    rec.outcome[i] = CLIENT_OVERLOAD
                else:
                    rec.outstanding += 1
                    rec.sent[i] = rec.now()
                    pool.send(i)
                i += 1
            await asyncio.sleep(max(schedule[i] - rec.now(), 0.0) if i < n else 0.0)
        if rec.outstanding:
            rec.all_done = asyncio.get_running_loop().create_future()
            # every request has its own timeout; this bound only guards against a bug
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rec.all_done, config.timeout_s + 1.0)
    finally:
        pool.abandon()
        pool.done = _unexpected
    return rec.samples(plan.span_s)


async def _closed_loop(pool: _Pool, config: WorkerConfig, plan: ClosedLoopPlan) -> Samples:
    limit = plan.max_requests
    rec = _Recorder(min(limit or _CLOSED_LOOP_CHUNK, _CLOSED_LOOP_CHUNK))
    pool.done = rec.finish
    loop = asyncio.get_running_loop()
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while rec.now() < plan.duration_s and (limit is None or next_index < limit):
            i = next_index
            next_index += 1
            if i >= len(rec.outcome):
                rec.grow(len(rec.outcome) + _CLOSED_LOOP_CHUNK)
            rec.scheduled[i] = rec.sent[i] = rec.now()  # a closed-loop client is due as soon as its answer came
            waiter = rec.waiters[i] = loop.create_future()
            rec.outstanding += 1
            pool.send(i)
            await waiter

    try:
        await asyncio.gather(*(client() for _ in range(plan.clients)))
    finally:
        pool.abandon()
        pool.done = _unexpected
    span_s = plan.duration_s if limit is None or next_index < limit else rec.now()
    return rec.samples(min(span_s, rec.now()), next_index)


if __name__ == "__main__":
    main()
