"""kiln.serve.batcher: the schedule arithmetic behind "merge only where it lowers the mean latency without raising
the worst", and how a request's deadline is judged against the queue ahead of it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.serve.batcher import Batcher, BatchPolicy, _merge_pays, _schedule
from kiln.serve.metrics import ServerMetrics
from kiln.serve.model import ServedModel, Work


def test_two_requests_run_apart_when_the_other_instance_is_about_to_be_free() -> None:
    # two 10 ms requests queued at 0 and 1 ms, 17 ms merged; now is 5 ms, the other instance is free at 7 ms
    apart = _schedule([0.005, 0.007], [(0.010, [0.0]), (0.010, [0.001])])
    together = _schedule([0.005, 0.007], [(0.017, [0.0, 0.001])])
    assert apart == pytest.approx((0.015 + 0.016, 0.016))
    assert together > apart  # merging would make the first wait for the second


def test_a_merge_that_helps_only_its_own_requests_must_save_more_than_it_delays_the_first() -> None:
    # the other instance is busy for long: apart, the second runs after the first on this instance
    apart = _schedule([0.005, 0.040], [(0.010, [0.0]), (0.010, [0.001])])
    saves_3ms = _schedule([0.005, 0.040], [(0.017, [0.0, 0.001])])
    saves_8ms = _schedule([0.005, 0.040], [(0.012, [0.0, 0.001])])  # a GPU-like merge
    assert apart == pytest.approx((0.015 + 0.024, 0.024))
    assert saves_3ms > apart  # the first waits 7 ms longer, the second is 3 ms sooner
    assert saves_8ms < apart


def test_under_a_backlog_a_merge_that_saves_work_lowers_the_mean_latency() -> None:
    # eight 10 ms requests queued 1 ms apart, two instances free at 10 ms: merging the first two saves 3 ms of work,
    # and the requests behind them on that instance start 3 ms sooner
    queued = [(0.010, [i / 1000]) for i in range(8)]
    apart = _schedule([0.010, 0.010], queued)
    together = _schedule([0.010, 0.010], [(0.017, [0.0, 0.001]), *queued[2:]])
    assert together < apart


def test_a_merge_that_lowers_the_mean_but_makes_the_oldest_request_the_worst_is_refused() -> None:
    # a burst behind a request that has already waited 50 ms: merging it with the next one saves 3 ms for the seven
    # behind them (a lower mean), but the oldest, already the slowest, would wait 7 ms longer: the P99 is its latency
    burst = [(0.010, [0.045 + i * 0.0005]) for i in range(8)]
    queued = [(0.010, [0.0]), *burst]
    apart = _schedule([0.050, 0.055], queued)
    together = _schedule([0.050, 0.055], [(0.017, [0.0, 0.045]), *burst[1:]])
    assert together[0] < apart[0]  # the mean alone says merge
    assert together[1] > apart[1] == pytest.approx(0.060)
    assert not _merge_pays(apart, together)


def test_under_a_growing_backlog_a_merge_that_saves_work_is_taken() -> None:
    # thirty requests 1 ms apart and two 10 ms engines (5 ms a request): the newest wait longest, and a merge that
    # saves 3 ms of work lowers the mean without delaying them
    queued = [(0.010, [0.020 + i * 0.001]) for i in range(30)]
    apart = _schedule([0.050, 0.055], queued)
    together = _schedule([0.050, 0.055], [(0.017, [0.020, 0.021]), *queued[2:]])
    assert _merge_pays(apart, together)
    assert not _merge_pays(together, apart)


def _line_cost_model(model: ServedModel, fixed_s: float, per_row_s: float) -> None:
    """Teach a tensor model's cost model an exact line (one length, as a tensor model's batches have)."""
    for rows in (1, 2, 4, 8, 16, 32):
        model.cost.observe(rows, 1, fixed_s + per_row_s * rows)


def test_a_deadline_is_judged_by_the_predicted_cost_of_the_queue_ahead(tiny_artifact: artifacts.Artifact) -> None:
    # one instance, a 1 ms + 0.1 ms/row engine, eight 8-row requests queued (the dispatch loop is not started, so
    # they stay queued): 8 x 1.8 ms = 14.4 ms of compute ahead, and 1.8 ms for the new request itself
    model = ServedModel(tiny_artifact, instances=1)
    _line_cost_model(model, 0.001, 0.0001)

    def work(rows: int) -> Work:
        feeds = {"input": np.zeros((rows, 4), dtype=np.float32)}
        return Work(rows=rows, key=(("input", (4,)),), length=1, outputs=["probabilities"], feeds=feeds)

    async def outcome(timeout_s: float, ahead: int = 8) -> str:
        batcher = Batcher(model, BatchPolicy(max_batch_size=32), ServerMetrics().for_model("tiny", 1))
        queued = [asyncio.create_task(batcher.submit(work(8), timeout_s=None)) for _ in range(ahead)]
        await asyncio.sleep(0)  # they join the queue
        late = asyncio.create_task(batcher.submit(work(8), timeout_s=timeout_s))
        await asyncio.sleep(0)
        result = "queued" if not late.done() else f"{type(late.exception()).__name__}: {late.exception()}"
        for task in [*queued, late]:
            task.cancel()
        await asyncio.gather(*queued, late, return_exceptions=True)
        return result

    # a 30 ms deadline can be met (16.2 ms predicted); a 10 ms one cannot
    assert asyncio.run(outcome(0.030)) == "queued"
    assert asyncio.run(outcome(0.010)) == (
        "Overloaded: request timeout is 10 ms but the queue ahead of it needs about 14.4 ms and its own compute about "
        "1.8 ms; retry later or allow a longer timeout"
    )
    # with nothing ahead the message blamed "the queue ahead", and 0.1 ms read "0 ms"
    assert asyncio.run(outcome(0.0001, ahead=0)) == (
        "Overloaded: request timeout is 0.1 ms but its own compute about 1.8 ms; retry later or allow a longer timeout"
    )


def test_drain_ends_when_the_last_queued_request_was_cancelled(tiny_artifact: artifacts.Artifact) -> None:
    # a client gave up while its request was queued; the dispatch loop drops it and finds nothing to run: drain()
    # (unload, SIGTERM) must still end, and the queue-depth gauge must read 0
    model = ServedModel(tiny_artifact, instances=1)
    metrics = ServerMetrics()

    async def drain_after_a_cancel() -> None:
        batcher = Batcher(model, BatchPolicy(), metrics.for_model("tiny", 1))
        feeds = {"input": np.zeros((2, 4), dtype=np.float32)}
        request = asyncio.create_task(
            batcher.submit(Work(2, (("input", (4,)),), 1, ["probabilities"], feeds=feeds), timeout_s=None)
        )
        await asyncio.sleep(0)  # queued; the dispatch loop is not running yet
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        draining = asyncio.create_task(batcher.drain())
        await asyncio.sleep(0)
        batcher.start()
        await asyncio.wait_for(draining, timeout=5)
        await batcher.close()

    asyncio.run(drain_after_a_cancel())
    assert metrics.registry.get_sample_value("kiln_queue_depth_rows", {"model": "tiny", "version": "1"}) == 0


@pytest.fixture
def lookup_artifact(tmp_path: Path) -> artifacts.Artifact:
    """A real ONNX embedding lookup: ``emb = table[idx]``, table 10 x 4 (row i holds 4i..4i+3). An index past the
    table passes every check before the queue (INT64, shape [-1]) and fails in ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln.types import Signature, TensorSpec

    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["emb"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "lookup.onnx"
    onnx.save(model, str(path))
    signature = Signature(inputs=(TensorSpec("idx", "INT64", (-1,)),), outputs=(TensorSpec("emb", "FP32", (-1, 4)),))
    return artifacts.write(tmp_path / "repo", artifacts.Manifest(name="lookup", signature=signature), path)


def test_a_request_the_engine_refuses_fails_alone_not_with_its_batch(lookup_artifact: artifacts.Artifact) -> None:
    # four requests queued before the dispatch loop starts, a cost model that says merging pays: one batch, which
    # ONNX Runtime refuses for index 99. Each runs again alone: three answers and one InvalidInput (a 400).
    from kiln.errors import InvalidInput

    model = ServedModel(lookup_artifact, instances=1)
    _line_cost_model(model, 0.010, 0.0001)
    batches: list[int] = []
    execute = model.execute

    def recording(works: list[Work], instance: int = 0, *, learn: bool = True) -> list[Any]:
        batches.append(len(works))
        return execute(works, instance, learn=learn)

    model.execute = recording  # type: ignore[method-assign]
    indices = [[1, 2], [3], [99, 0], [9]]

    async def run_all() -> list[Any]:
        batcher = Batcher(model, BatchPolicy(max_batch_size=32), ServerMetrics().for_model("lookup", 1))
        works = [Work(len(i), (), 1, ["emb"], feeds={"idx": np.array(i, dtype=np.int64)}) for i in indices]
        requests = [asyncio.create_task(batcher.submit(w, timeout_s=None)) for w in works]
        await asyncio.sleep(0)  # all four queued
        batcher.start()
        results = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), timeout=30)
        await batcher.close()
        return results

    results = asyncio.run(run_all())
    assert batches == [4, 1, 1, 1, 1]  # together, then each alone
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i]["emb"], table[indices[i]])
    assert isinstance(results[2], InvalidInput)
    assert "idx=99" in str(results[2]) and "check the values" in str(results[2])


def test_a_worker_that_fails_outside_the_engine_answers_its_requests_and_frees_its_instance(
    lookup_artifact: artifacts.Artifact,
) -> None:
    # a bug after the engine ran (here the metrics raise): the requests of that batch get an error instead of
    # waiting forever, the instance takes the next batch, and close() stops the worker threads
    model = ServedModel(lookup_artifact, instances=1)
    metrics = ServerMetrics().for_model("lookup", 1)
    calls = 0
    batch = metrics.batch

    def failing_once(rows: int, seconds: float, requests: int = 1) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug in the metrics")
        batch(rows, seconds, requests)

    metrics.batch = failing_once  # type: ignore[method-assign]

    async def run_two() -> tuple[list[Any], Batcher]:
        batcher = Batcher(model, BatchPolicy(batching=False), metrics)
        batcher.start()
        results = []
        for index in (1, 2):
            work = Work(1, (), 1, ["emb"], feeds={"idx": np.array([index], dtype=np.int64)})
            results.append(
                await asyncio.wait_for(asyncio.gather(batcher.submit(work, timeout_s=None), return_exceptions=True), 10)
            )
        await batcher.close()
        return [r for (r,) in results], batcher

    (first, second), batcher = asyncio.run(run_two())
    assert isinstance(first, RuntimeError) and "the worker running lookup failed" in str(first)
    np.testing.assert_array_equal(second["emb"], np.arange(40, dtype=np.float32).reshape(10, 4)[[2]])
    assert not any(worker.is_alive() for worker in batcher._workers)
