"""Dynamic batching per model version: rows not requests, a bounded queue, deadlines, and a learned cost.

When an engine instance is free, the dispatch loop looks at the oldest request and the queued requests that can
be stacked with it (same input shapes), up to ``max_batch_size`` rows, asks the model's ``BatchCostModel`` how
to cut them into batches of least total time (text grouped by length, so batches carry little padding), and
takes the batch that holds the oldest request; the rest wait for the next free instance. It holds requests back
for batch-mates only when the cost model says a full batch makes a row markedly cheaper (a GPU) *and* the
arrival rate would keep the engine busy; on two CPU cores it learns that waiting does not pay and dispatches at
once, so batching never makes the tail worse. Inference runs on worker threads (one per engine instance; ONNX
Runtime releases the GIL), never on the event loop.

Nothing here knows about HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from kiln.errors import InvalidInput, Overloaded
from kiln.serve.metrics import ModelMetrics
from kiln.serve.model import ServedModel, Work
from kiln.types import Feeds

_Job = tuple[list["_Pending"], asyncio.AbstractEventLoop]  # a batch for a worker thread, and the loop to answer on

logger = logging.getLogger(__name__)

# The batcher holds a request back for batch-mates only when a full batch makes a row at least this much cheaper
# AND the engine would be at least this busy running requests one by one at the current arrival rate. Below that
# load, waiting only adds latency: requests that arrive while the engine is busy are batched anyway.
# Measured with MiniLM on two CPU cores (bench/serve_batch_cost.py): a batch of 32 makes a row 1.5x cheaper at 16
# tokens, 1.26x at 32 and no cheaper at 64 or more, and holding requests back for it raised P99; on a GPU the gain
# is 10-30x. The bar sits between the two.
WAIT_PAYS_GAIN = 3.0
WAIT_PAYS_UTILIZATION = 0.5
# How far down the queue merge candidates are sought (:meth:`Batcher._take`) and a merge is judged
# (:meth:`Batcher._merge_pays_now`); it bounds the event loop's work per dispatch.
_SCHEDULE_HORIZON = 64
_RATE_SMOOTHING = 0.05  # weight of the newest inter-arrival gap in the arrival-rate estimate
_TYPICAL_LENGTH = 32  # tokens of a typical text request, where the batcher plans for requests not yet seen


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.005
    p99_target_s: float | None = None
    max_queue_rows: int = 1024
    batching: bool = True


@dataclass
class _Pending:
    work: Work
    future: asyncio.Future[Feeds]
    enqueued: float
    deadline: float | None
    cost_s: float  # predicted seconds to run alone, when it was queued (the model changes slowly)


class Batcher:
    """Queues validated requests of one model version and runs them in batches on worker threads.

    Example:
        >>> batcher = Batcher(model, BatchPolicy(max_batch_size=32), metrics)  # doctest: +SKIP
        >>> batcher.start()  # doctest: +SKIP
        >>> outputs = await batcher.submit(model.prepare(request, max_rows=256), timeout_s=None)  # doctest: +SKIP
    """

    def __init__(self, model: ServedModel, policy: BatchPolicy, metrics: ModelMetrics) -> None:
        self.model = model
        self.policy = policy
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._queued_cost_s = 0.0  # the queued requests' predicted seconds, each run alone
        self._inflight = 0
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        instances = len(model.engines)
        self._free = asyncio.Semaphore(instances)
        self._free_instances = list(range(instances))
        self._busy_until: dict[int, float] = {}  # instance -> predicted end of its running batch
        # One worker thread per engine instance, fed through its own queue: a batch costs one put and one
        # call back into the loop, with no futures (an executor wraps every call in two).
        self._jobs: list[queue.SimpleQueue[_Job | None]] = [queue.SimpleQueue() for _ in range(instances)]
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"kiln-{model.name}-{i}", daemon=True)
            for i in range(instances)
        ]
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_arrival = 0.0
        self._mean_gap_s = float("inf")  # smoothed time between arrivals
        self._mean_rows = 1.0
        self._typical_length = _TYPICAL_LENGTH if model.is_text else 1  # a tensor model's batches have length 1

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"batcher-{self.model.name}")

    async def drain(self) -> None:
        """Wait until every queued and running request has finished."""
        while self._queue or self._inflight:
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> None:
        """Drain, then stop the loop and the worker threads."""
        self._closed = True
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for jobs in self._jobs:
            jobs.put(None)
        for worker in self._workers:
            if worker.is_alive():
                worker.join()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def running_batches(self) -> int:
        """Engine instances busy now."""
        return self._inflight

    # -- the request side ---------------------------------------------------------------------------------------
    async def submit(self, work: Work, *, timeout_s: float | None) -> Feeds:
        """Queue a request and wait for its outputs.

        Raises:
            Overloaded: the queue is full, or the request cannot finish before its deadline.
        """
        policy = self.policy
        if self._queued_rows + work.rows > policy.max_queue_rows:
            raise Overloaded(
                f'model "{self.model.name}" has {self._queued_rows} rows queued and accepts at most '
                f"{policy.max_queue_rows}; retry after a short wait or add capacity",
                model=self.model.name,
                retry_after_s=1,
                reason="queue_full",
            )
        now = time.perf_counter()
        deadline = None
        cost_s = self.model.cost.predict(work.rows, work.length)
        if timeout_s is not None:
            deadline = now + timeout_s
            wait_s = self._expected_wait_s(now)
            if wait_s + cost_s > timeout_s:
                ahead = f"the queue ahead of it needs about {wait_s * 1000:.3g} ms and " if wait_s > 0 else ""
                raise Overloaded(
                    f"request timeout is {timeout_s * 1000:.3g} ms but {ahead}its own compute about "
                    f"{cost_s * 1000:.3g} ms; retry later or allow a longer timeout",
                    model=self.model.name,
                    retry_after_s=1,
                    reason="deadline",
                )
        if self._closed:
            raise Overloaded(
                f'model "{self.model.name}" version {self.model.version} is being unloaded; retry',
                model=self.model.name,
                retry_after_s=1,
            )
        self._observe_arrival(now, work.rows)
        future: asyncio.Future[Feeds] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(work, future, now, deadline, cost_s))
        self._queued_rows += work.rows
        self._queued_cost_s += cost_s
        self.metrics.queue_depth(self._queued_rows)
        self._arrived.set()
        return await future

    def _observe_arrival(self, now: float, rows: int) -> None:
        if self._last_arrival:
            gap = now - self._last_arrival
            if self._mean_gap_s == float("inf"):
                self._mean_gap_s = gap
            else:
                self._mean_gap_s += _RATE_SMOOTHING * (gap - self._mean_gap_s)
            self._mean_rows += _RATE_SMOOTHING * (rows - self._mean_rows)
        self._last_arrival = now

    @property
    def arrival_rows_per_s(self) -> float:
        """Smoothed arrival rate in rows per second (0 before two arrivals)."""
        return self._mean_rows / self._mean_gap_s if self._mean_gap_s > 0 else 0.0

    def _expected_wait_s(self, now: float) -> float:
        """Predicted seconds before a new request starts: until an engine instance is free (now, or when the running
        batch that ends first is predicted to end), then the queue ahead, each request's predicted cost alone (a
        merge only shortens it), spread over the instances.
        """
        free_in = 0.0
        if not self._free_instances and self._busy_until:
            free_in = max(0.0, min(self._busy_until.values()) - now)
        return free_in + max(0.0, self._queued_cost_s) / len(self.model.engines)

    # -- the dispatch side --------------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._free.acquire()
            if self.policy.batching and self.model.merges_requests and self._waiting_pays():
                await self._gather_batch_mates()
            taken = self._take()
            if not taken:
                self._free.release()
                continue
            instance = self._free_instances.pop()
            rows, length = sum(p.work.rows for p in taken), max(p.work.length for p in taken)
            self._busy_until[instance] = time.perf_counter() + self.model.cost.predict(rows, length)
            self._inflight += 1
            self._jobs[instance].put((taken, loop))

    def _waiting_pays(self) -> bool:
        policy = self.policy
        if policy.max_batch_size <= 1 or policy.max_queue_delay_s <= 0 or self._queued_rows >= policy.max_batch_size:
            return False
        cost = self.model.cost
        if cost.batching_gain(policy.max_batch_size, self._typical_length) < WAIT_PAYS_GAIN:
            return False
        busy_alone = self.arrival_rows_per_s * cost.predict(1, self._typical_length) / len(self.model.engines)
        return busy_alone >= WAIT_PAYS_UTILIZATION

    async def _gather_batch_mates(self) -> None:
        policy = self.policy
        oldest = self._queue[0].enqueued
        wait_s = policy.max_queue_delay_s
        if policy.p99_target_s is not None:
            full_batch_s = self.model.cost.predict(policy.max_batch_size, self._typical_length)
            wait_s = min(wait_s, max(0.0, policy.p99_target_s - full_batch_s) / 2)
        until = oldest + wait_s
        while self._queued_rows < policy.max_batch_size:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """The next batch: the oldest request plus the queued requests the cost model says to run with it.

        Candidates are queued requests of the oldest one's kind, in arrival order among the first
        ``_SCHEDULE_HORIZON``, whose length is close enough to the oldest one's that sharing a batch with it can
        pay (``BatchCostModel.may_share_batch``), up to ``max_batch_size`` rows or this instance's share of the
        backlog (queued rows over free instances), whichever is smaller. The cost model cuts them into batches of
        least total time, and the batch holding the oldest request is taken if that pays against running its
        requests apart (:meth:`_merge_pays_now`). The length filter keeps that work small under a backlog, when
        an engine instance waits for it.
        The others stay queued for the next free instance, so no instance idles while another works through a
        backlog.
        """
        now = time.perf_counter()
        while self._queue and self._expired(self._queue[0], now):
            self._fail_expired(self._queue.popleft())
        if not self._queue:  # its last requests expired or were cancelled: nothing to run
            self.metrics.queue_depth(self._queued_rows)
            if not self._inflight:
                self._idle.set()  # drain() waits for this, and no batch is left to set it when it ends
            return []
        limit = self.policy.max_batch_size if self.policy.batching else 1
        # Share the backlog among the free engine instances: two requests and two idle instances run side by side,
        # never as one batch while the other instance idles (on a CPU that is slower for both).
        limit = min(limit, max(1, -(-self._queued_rows // max(1, len(self._free_instances)))))
        first = self._queue.popleft()
        candidates, rows = [first], first.work.rows
        if self.model.merges_requests and limit > 1:
            kept: deque[_Pending] = deque()
            may_share, work = self.model.cost.may_share_batch, first.work
            scanned = 0
            while self._queue and rows < limit and scanned < _SCHEDULE_HORIZON:
                item = self._queue.popleft()
                scanned += 1
                if self._expired(item, now):
                    self._fail_expired(item)
                elif (
                    item.work.key == work.key
                    and rows + item.work.rows <= limit
                    and may_share(work.rows, work.length, item.work.rows, item.work.length)
                ):
                    candidates.append(item)
                    rows += item.work.rows
                else:
                    kept.append(item)
            kept.extend(self._queue)
            self._queue = kept
        taken = candidates
        if len(candidates) > 1:
            lengths, counts = [p.work.length for p in candidates], [p.work.rows for p in candidates]
            plan = self.model.cost.plan(lengths, counts, max(limit, first.work.rows))
            chosen = set(next(batch for batch in plan if 0 in batch))
            if len(chosen) > 1 and not self._merge_pays_now({id(candidates[i]) for i in chosen}, candidates, now):
                chosen = {0}
            taken = [p for i, p in enumerate(candidates) if i in chosen]
            returned = [p for i, p in enumerate(candidates) if i not in chosen]
            if returned:  # back into the queue in arrival order
                self._queue = deque(sorted([*returned, *self._queue], key=lambda p: p.enqueued))
        self._queued_rows -= sum(p.work.rows for p in taken)
        self._queued_cost_s = self._queued_cost_s - sum(p.cost_s for p in taken) if self._queue else 0.0
        self.metrics.queue_depth(self._queued_rows)
        for pending in taken:
            self.metrics.queued(now - pending.enqueued)
        return taken

    def _merge_pays_now(self, group: set[int], candidates: list[_Pending], now: float) -> bool:
        """Whether running ``group`` (ids of ``candidates``) as one batch now serves the head of the queue better.

        Both ways are list-scheduled with the cost model's predictions over the first ``_SCHEDULE_HORIZON``
        requests: each request (or the merged batch, first) goes to the engine instance that is free soonest; the
        free instances are free now, the busy ones when their running batch is predicted to end. Which way wins
        is :func:`_merge_pays`'s rule.
        """
        cost = self.model.cost
        free_at = [now] * len(self._free_instances)
        free_at += [
            max(now, self._busy_until.get(i, now))
            for i in range(len(self.model.engines))
            if i not in self._free_instances
        ]
        waiting = itertools.islice(self._queue, _SCHEDULE_HORIZON)  # the candidates are out of the queue now
        horizon = sorted([*candidates, *waiting], key=lambda p: p.enqueued)[:_SCHEDULE_HORIZON]
        merged = [p for p in candidates if id(p) in group]
        batch_s = cost.predict(sum(p.work.rows for p in merged), max(p.work.length for p in merged))
        one_by_one = [(p, (p.cost_s, [p.enqueued])) for p in horizon]
        apart = _schedule(list(free_at), [job for _, job in one_by_one])
        rest = [job for p, job in one_by_one if id(p) not in group]
        together = _schedule(list(free_at), [(batch_s, [p.enqueued for p in merged]), *rest])
        return _merge_pays(apart, together)

    @staticmethod
    def _expired(pending: _Pending, now: float) -> bool:
        return pending.future.cancelled() or (pending.deadline is not None and now > pending.deadline)

    def _fail_expired(self, pending: _Pending) -> None:
        self._queued_rows -= pending.work.rows
        self._queued_cost_s -= pending.cost_s
        if not pending.future.done():
            pending.future.set_exception(
                Overloaded(
                    f'request to model "{self.model.name}" waited {(time.perf_counter() - pending.enqueued) * 1000:.0f}'
                    " ms in the queue and passed its deadline; retry later or allow a longer timeout",
                    model=self.model.name,
                    retry_after_s=1,
                    reason="deadline",
                )
            )

    def _work(self, instance: int) -> None:
        """Worker thread of engine ``instance``: run the batches the dispatch loop hands it, until told to stop."""
        jobs = self._jobs[instance]
        while (job := jobs.get()) is not None:
            try:
                self._run(*job, instance)
            except Exception:  # a bug outside the engine: _run has answered the batch; this thread runs the next
                logger.exception("the worker of %s's instance %d failed", self.model.name, instance)

    def _run(self, group: list[_Pending], loop: asyncio.AbstractEventLoop, instance: int) -> None:
        """Worker thread: run one batch on engine ``instance`` and hand the outcome back to the event loop.

        When a batch of several requests fails, each of them runs again alone, so a request the engine refuses
        (a value no check before the queue could see) fails by itself, not with the requests it was batched with.
        """
        outcomes: list[tuple[list[_Pending], list[Feeds] | Exception]] = []
        try:
            outcome = self._run_together(group, instance)
            if isinstance(outcome, Exception) and len(group) > 1:
                logger.warning(
                    "a batch of %d requests failed on %s; running them one by one", len(group), self.model.name
                )
                outcomes = [([pending], self._run_together([pending], instance)) for pending in group]
            else:
                outcomes = [(group, outcome)]
        finally:
            loop.call_soon_threadsafe(self._complete, group, outcomes, instance)

    def _run_together(self, group: list[_Pending], instance: int) -> list[Feeds] | Exception:
        """Run ``group`` as one batch: its outputs, one per request, or the error that stopped it."""
        started = time.perf_counter()
        try:
            results = self.model.execute([p.work for p in group], instance)
        except Exception as exc:
            if len(group) == 1:
                if isinstance(exc, InvalidInput):  # the request's own values: the client's mistake, told in a 400
                    logger.info("request refused by %s's engine: %s", self.model.name, exc)
                else:
                    logger.exception("request failed on %s", self.model.name)
            return exc
        self.metrics.batch(sum(p.work.rows for p in group), time.perf_counter() - started, len(group))
        return results

    def _complete(
        self, group: list[_Pending], outcomes: list[tuple[list[_Pending], list[Feeds] | Exception]], instance: int
    ) -> None:
        """On the event loop: answer a batch's requests, then free its engine instance."""
        for members, outcome in outcomes:
            if isinstance(outcome, Exception):
                _fail_all(members, outcome)
            else:
                _resolve_all(members, outcome)
        stranded = [p for p in group if not p.future.done()]
        if stranded:  # the worker failed outside the engine (a bug): its requests must not wait forever
            failed = RuntimeError(f"the worker running {self.model.name} failed; the server log has the details")
            _fail_all(stranded, failed)
        self._finished(instance)

    def _finished(self, instance: int) -> None:
        self._inflight -= 1
        self._free_instances.append(instance)
        self._busy_until.pop(instance, None)
        self._free.release()
        if not self._queue and not self._inflight:
            self._idle.set()


def _resolve_all(group: list[_Pending], results: list[Feeds]) -> None:
    for pending, result in zip(group, results, strict=True):
        if not pending.future.done():
            pending.future.set_result(result)


def _fail_all(group: list[_Pending], exc: Exception) -> None:
    for pending in group:
        if not pending.future.done():
            pending.future.set_exception(exc)


def _merge_pays(apart: tuple[float, float], together: tuple[float, float]) -> bool:
    """Whether a merge pays, given both ways' ``(sum, worst)`` of predicted latencies (:func:`_schedule`): it must
    lower the mean latency without raising the worst.

    A merged batch answers all its requests when its slowest row is done, so a merge makes its oldest request wait
    for the others' compute and saves the requests behind it the work it saves. The mean alone would merge in a
    burst behind a request that has already waited longest: the requests behind it gain a little each, and it, the
    request that sets the P99, waits longer. The worst alone would refuse a merge under a steady backlog whenever
    the oldest request happens to be the worst. Both together merge exactly where the queue is growing. Worst
    latencies within a microsecond count as a tie (sums of the same times in another order can differ in the last
    bit).
    """
    (total_together, worst_together), (total_apart, worst_apart) = together, apart
    return total_together < total_apart and worst_together <= worst_apart + 1e-6


def _schedule(free_at: list[float], jobs: list[tuple[float, list[float]]]) -> tuple[float, float]:
    """List-schedule ``jobs`` (seconds, the enqueue times of its requests) in order, each on the instance free
    soonest (``free_at``). Returns the sum and the largest of the requests' predicted latencies (end - enqueued).
    """
    heapq.heapify(free_at)
    total = worst = 0.0
    for seconds, enqueued in jobs:
        end = heapq.heappop(free_at) + seconds
        heapq.heappush(free_at, end)
        for t in enqueued:
            total, worst = total + end - t, max(worst, end - t)
    return total, worst
