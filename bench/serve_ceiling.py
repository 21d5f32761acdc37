"""The queueing ceiling of issue 3's first bar: the highest Poisson rate any server could sustain at P99 <= 200 ms
with the engine instances `kiln serve` runs, on this machine, with no HTTP, no event loop and no client at all.

`bench/serve_minilm.py` compares Kiln's highest rate at P99 <= 200 ms with the in-process engine's throughput
(length-sorted batches of 32). The two are different kinds of figure: a throughput at full utilisation, and a rate
whose P99 must stay bounded while requests arrive at random. This script measures how far apart they must be:

  1. the in-process figure, as `serve_minilm.py` measures it (the bar's denominator);
  2. the service time of every request text on the engine instances `kiln serve` builds (ServedModel: by default
     one single-thread ONNX Runtime session per core), timed with all instances running at once, so their
     contention for the cores and caches is in the times (tokenisation and padding included, as the server does);
  3. a simulation of those instances as a first-come-first-served queue with Poisson arrivals, requests cycling
     through the texts as the load generator sends them, one request per instance at a time, no batching: the
     highest rate whose P99 (median over ``--seeds`` simulated runs) stays within ``--p99-ms``.

The simulated server has no overhead at all, so its rate is a ceiling for a server of these instances, not a
prediction; ``--overhead-ms`` adds a fixed cost to every request to show how fast the ceiling falls.

    python bench/serve_ceiling.py --repo /tmp/kb         # minilm v1 = FP32 (or, without --repo, exported first)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_minilm's in-process figure, measured its way

from serve_minilm import in_process, prepare

from kiln._utils import write_result
from kiln.data import english_corpus
from kiln.serve.model import ServedModel

console = Console(width=120)


def service_times(model: ServedModel, texts: list[str], passes: int) -> np.ndarray[Any, Any]:
    """Seconds per text (median over ``passes``) on each of ``model``'s instances, all instances running at once;
    shape (instances, texts). Instance ``i`` starts at text ``i * len(texts) / instances``, so at any moment the
    instances run different texts, as they do under load."""
    tokenizer = model.tokenizer
    assert tokenizer is not None, "a text model"
    names = list(model.engine_inputs)
    count = len(model.engines)
    times = np.zeros((count, passes, len(texts)))
    start = threading.Barrier(count)

    def worker(instance: int) -> None:
        engine = model.engines[instance]
        offset = instance * len(texts) // count
        order = [(offset + k) % len(texts) for k in range(len(texts))]
        for index in order[:16]:  # warm-up
            engine.run(tokenizer.pad(tokenizer.encode([texts[index]]), names))
        start.wait()
        for p in range(passes):
            for index in order:
                began = time.perf_counter()
                ids = tokenizer.encode([texts[index]])
                engine.run(tokenizer.pad(ids, names))
                times[instance, p, index] = time.perf_counter() - began

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.median(times, axis=1)


def simulate_p99_ms(service_s: np.ndarray[Any, Any], rate: float, requests: int, seed: int, overhead_s: float) -> float:
    """P99 latency (ms) of a FCFS queue feeding ``len(service_s)`` instances, Poisson arrivals at ``rate``; request
    ``i`` is text ``i % texts`` and takes instance ``k``'s measured time for it on whichever instance ``k`` frees
    first."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
    free_at = np.zeros(service_s.shape[0])
    texts = service_s.shape[1]
    latency = np.empty(requests)
    for i, arrival in enumerate(arrivals):
        instance = int(np.argmin(free_at))
        start = max(arrival, free_at[instance])
        free_at[instance] = start + service_s[instance, i % texts] + overhead_s
        latency[i] = free_at[instance] - arrival
    return float(np.percentile(latency, 99) * 1e3)


def ceiling(service_s: np.ndarray[Any, Any], args: argparse.Namespace, overhead_s: float) -> tuple[float, list[Any]]:
    """The highest rate (to ``--resolution`` req/s) whose median-over-seeds simulated P99 is within ``--p99-ms``,
    by bisection between 1 req/s and the instances' full-utilisation throughput; and the rates tried."""

    def p99(rate: float) -> float:
        return statistics.median(
            simulate_p99_ms(service_s, rate, args.requests, seed, overhead_s) for seed in range(args.seeds)
        )

    low, high = 1.0, float(service_s.shape[0] / (service_s.mean() + overhead_s))
    tried = []
    while high - low > args.resolution:
        middle = (low + high) / 2
        value = p99(middle)
        tried.append({"rate": round(middle, 2), "p99_ms": round(value, 1)})
        low, high = (middle, high) if value <= args.p99_ms else (low, middle)
    return low, tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None, help="Reuse REPO/minilm (v1 = FP32).")
    parser.add_argument(
        "--texts", type=int, default=None, help="Texts: the first N paragraphs (default: all, as the load sends them)."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Repeats of the in-process figure.")
    parser.add_argument("--passes", type=int, default=3, help="Timed passes over the texts per instance.")
    parser.add_argument("--instances", type=int, default=None, help="Engine instances (default: kiln serve's).")
    parser.add_argument("--p99-ms", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=20_000, help="Simulated requests per run.")
    parser.add_argument("--seeds", type=int, default=5, help="Simulated runs per rate; their median P99 counts.")
    parser.add_argument("--resolution", type=float, default=0.5, help="Bisection stops within this many req/s.")
    parser.add_argument("--overhead-ms", default="0,1,2", help="Fixed per-request costs to add, comma-separated.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_ceiling.json")
    args = parser.parse_args()

    texts = english_corpus()[: args.texts]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = prepare(args.repo, Path(tmp), want_variant=False)
        console.print(f"MiniLM v{fp32.version} at {fp32.path}; {len(texts)} texts")
        inproc = in_process(fp32, texts, args.repeats)
        model = ServedModel(fp32, instances=args.instances)
        console.print(f"engine instances as kiln serve builds them: {model.settings}")
        service = service_times(model, texts, args.passes)
    rows = []
    for overhead_ms in (float(v) for v in args.overhead_ms.split(",")):
        rate, tried = ceiling(service, args, overhead_ms / 1e3)
        rows.append({"overhead_ms": overhead_ms, "ceiling_rps": rate, "tried": tried})

    denominator = inproc["sorted_batch32_sps"]
    table = Table(
        title=f"MiniLM FP32: the highest rate with P99 <= {args.p99_ms:g} ms, {model.settings['instances']} instances"
    )
    for column in ("server", "requests/s", "/ in-process sorted-32"):
        table.add_column(column, justify="left" if column == "server" else "right")
    table.add_row("in-process, sorted batches of 32 (throughput)", f"{denominator:.1f}", "1.00")
    table.add_row(
        "in-process, batch 1 (throughput)", f"{inproc['batch1_sps']:.1f}", f"{inproc['batch1_sps'] / denominator:.2f}"
    )
    for row in rows:
        label = (
            "queueing ceiling, no overhead"
            if not row["overhead_ms"]
            else f"ceiling, +{row['overhead_ms']:g} ms a request"
        )
        table.add_row(label, f"{row['ceiling_rps']:.1f}", f"{row['ceiling_rps'] / denominator:.2f}")
    table.add_row("the bar: 0.85 x in-process", f"{0.85 * denominator:.1f}", "0.85")
    console.print(table)
    mean_ms, p99_ms = float(service.mean() * 1e3), float(np.percentile(service, 99) * 1e3)
    console.print(f"service time per request, instances running at once: mean {mean_ms:.1f} ms, P99 {p99_ms:.1f} ms")

    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "engine": model.settings,
        "in_process": inproc,
        "service_ms": {"mean": mean_ms, "p50": float(np.median(service) * 1e3), "p99": p99_ms},
        "ceilings": rows,
        "ceiling_over_in_process": rows[0]["ceiling_rps"] / denominator,
        "processor": platform.processor(),
    }
    write_result(args.out, result, ("kiln", "onnxruntime", "numpy"))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
