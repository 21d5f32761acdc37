"""What batching saves per row on this machine, as `kiln serve` runs MiniLM: engines side by side, one thread each.

The batcher merges requests only where the cost model says a batch is cheaper than its rows one by one, and
holds requests back for batch-mates only where a full batch makes a row at least 3x cheaper
(``WAIT_PAYS_GAIN`` in ``kiln/serve/batcher.py``). This measures that gain directly: every engine instance the
server would start (one single-threaded ONNX Runtime session per core on a CPU) runs batches of ``--batches``
rows at ``--lengths`` tokens at the same time, as under load; the figure is milliseconds per row, the median over
``--repeats`` timed rounds after a warm-up, and the gain is batch 1's per-row time over each batch's.

    python bench/serve_batch_cost.py --repo /tmp/kb
    python bench/serve_batch_cost.py --repo /tmp/kb --instances 1 --json /tmp/batch_cost_1.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kiln import artifact as artifacts
from kiln._utils import write_result
from kiln.runtime import OrtEngine, TextTokenizer, preferred_providers
from kiln.runtime.hardware import probe
from kiln.serve.model import default_instances
from kiln.types import Feeds

MODEL = "minilm"
console = Console(width=120)


def feeds_for(engine: OrtEngine, rows: int, length: int) -> Feeds:
    """``rows`` rows of ``length`` real-looking token ids (id 2000), padded as the server pads them."""
    return TextTokenizer.pad([[2000] * length] * rows, [spec.name for spec in engine.inputs])


def per_row_ms(engines: list[OrtEngine], rows: int, length: int, calls: int) -> float:
    """Every engine runs ``calls`` batches at once, each on its own thread; the mean per-row milliseconds."""
    results: list[float] = []
    barrier = threading.Barrier(len(engines))

    def work(engine: OrtEngine) -> None:
        feeds = feeds_for(engine, rows, length)
        engine.run(feeds)
        barrier.wait()
        started = time.perf_counter()
        for _ in range(calls):
            engine.run(feeds)
        results.append((time.perf_counter() - started) / calls / rows * 1e3)

    threads = [threading.Thread(target=work, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statistics.fmean(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None, help="A repository holding minilm (else: export it).")
    parser.add_argument("--instances", type=int, default=0, help="Engines side by side (0: as kiln serve).")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--lengths", default="16,32,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows-per-call", type=int, default=64, help="Rows each timed round runs per engine.")
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_batch_cost.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    instances = args.instances or default_instances()

    with tempfile.TemporaryDirectory() as tmp:
        if args.repo is not None and artifacts.versions(args.repo / MODEL):
            art = artifacts.load(args.repo / MODEL, artifacts.versions(args.repo / MODEL)[0])
        else:
            from kiln.export import bundled_minilm_path, export

            console.print("exporting FP32 MiniLM from the bundled package ...")
            art = export(bundled_minilm_path(), out=Path(tmp), name=MODEL)
        engines = [
            OrtEngine(art.model_path, providers=preferred_providers(), intra_op_threads=1, allow_spinning=False)
            for _ in range(instances)
        ]
        figures: dict[int, dict[int, float]] = {}
        for length in lengths:
            figures[length] = {}
            for rows in batches:
                calls = max(2, args.rows_per_call // rows)
                per_row_ms(engines, rows, length, 1)  # warm-up: this shape's first runs allocate
                figures[length][rows] = statistics.median(
                    per_row_ms(engines, rows, length, calls) for _ in range(args.repeats)
                )
            shown = ", ".join(f"{rows}: {figures[length][rows]:.2f}" for rows in batches)
            console.print(f"  {length} tokens, ms per row by batch: {shown}")

    table = Table(title=f"MiniLM FP32, {instances} one-thread engines side by side: ms per row (gain over batch 1)")
    table.add_column("tokens", justify="right")
    for rows in batches:
        table.add_column(f"batch {rows}", justify="right")
    for length in lengths:
        alone = figures[length][batches[0]]
        table.add_row(
            str(length), *(f"{figures[length][rows]:.2f} ({alone / figures[length][rows]:.2f}x)" for rows in batches)
        )
    console.print(table)
    payload = {
        "benchmark": "serve_batch_cost",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": str(art.model_path),
        "instances": instances,
        "repeats": args.repeats,
        "per_row_ms": {str(n): {str(b): v for b, v in row.items()} for n, row in figures.items()},
        "gain_over_batch1": {
            str(n): {str(b): row[batches[0]] / v for b, v in row.items()} for n, row in figures.items()
        },
        "hardware": probe(),
    }
    write_result(args.json, payload, ("onnxruntime", "numpy", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
