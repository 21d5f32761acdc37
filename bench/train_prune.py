"""Structured pruning + fine-tuning on digits: smaller tensors, and how much faster in ONNX Runtime (measured).

A CNN is trained and exported (dense); then the same run is resumed from its last checkpoint with
``prune_ratio`` set, so each pruned variant starts from the very same dense weights, is pruned (channels ranked
by L1 norm), fine-tuned and exported. All artifacts are timed in ONNX Runtime (1 thread) on the held-out rows,
interleaved in rounds after a warm-up, at each batch size; medians, and the median of per-round ratios.

    python bench/train_prune.py
    python bench/train_prune.py --ratios 0.5,0.75 --batch-sizes 1,64,450 --importance taylor
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln._utils import write_result
from kiln.artifact import Artifact
from kiln.config import ExportSettings
from kiln.data import eval_set
from kiln.runtime import OrtEngine
from kiln.train import TrainSettings, train


def timed(engine: OrtEngine, x: np.ndarray, repeats: int) -> float:  # type: ignore[type-arg]
    started = time.perf_counter()
    for _ in range(repeats):
        engine.run({"input": x})
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--importance", default="l1", choices=["l1", "taylor"])
    parser.add_argument("--widths", default="32,64", help="the dense CNN's conv channels")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--prune-epochs", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,64,450")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_prune.json"))
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        base = TrainSettings(
            dataset="digits",
            model="cnn",
            hidden_sizes=tuple(int(w) for w in args.widths.split(",")),
            epochs=args.epochs,
            lr=3e-3,
            schedule="cosine",
            track=False,
            out=f"{tmp}/repo",
            checkpoint_every=0,
            checkpoint_dir=f"{tmp}/ck",
            name="dense",
        )
        export = ExportSettings(exporter="torchscript")
        runs = {"dense": train(base, export_settings=export)}
        for ratio in ratios:
            settings = TrainSettings(
                **(vars(base) | {"name": f"pruned-{ratio:g}", "resume": "latest", "prune_ratio": ratio})
                | {"prune_importance": args.importance, "prune_epochs": args.prune_epochs}
            )
            runs[f"pruned {ratio:.0%}"] = train(settings, export_settings=export)
        arts: dict[str, Artifact] = {}
        for name, run in runs.items():
            assert run.artifact is not None
            arts[name] = run.artifact
        engines = {name: OrtEngine(a.model_path, intra_op_threads=1) for name, a in arts.items()}
        held_out = eval_set(arts["dense"])
        assert held_out.feeds is not None and held_out.labels is not None
        x, y = held_out.feeds["input"], held_out.labels
        acc = {n: float((e.run({"input": x})["logits"].argmax(axis=1) == y).mean()) for n, e in engines.items()}
        times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in sizes} for name in engines}
        for batch in sizes:
            rows = np.ascontiguousarray(x[:batch])
            for engine in engines.values():
                timed(engine, rows, args.repeats)  # warm-up
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    times[name][batch].append(timed(engine, rows, args.repeats))
        size_bytes = {name: a.manifest.model["size_bytes"] for name, a in arts.items()}
        params = {name: run.metrics.get("params", float("nan")) for name, run in runs.items()}
        params["dense"] = runs[next(iter(runs.keys() - {"dense"}))].metrics["params_dense"] if ratios else 0.0

    table = Table(title=f"digits CNN {args.widths}: pruned + fine-tuned vs dense in ONNX Runtime (1 thread)")
    for column in ("model", "accuracy", "params", "onnx size"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for batch in sizes:
        table.add_column(f"batch {batch} µs", justify="right")
        table.add_column("speed-up", justify="right")
    speedups: dict[str, dict[int, float]] = {}
    for name in engines:
        speedups[name] = {
            b: statistics.median(d / p for d, p in zip(times["dense"][b], times[name][b], strict=True)) for b in sizes
        }
        cells = [
            cell
            for b in sizes
            for cell in (f"{statistics.median(times[name][b]) * 1e6:.1f}", f"{speedups[name][b]:.2f}x")
        ]
        table.add_row(name, f"{acc[name]:.4f}", f"{params[name]:,.0f}", f"{size_bytes[name] / 1e3:.1f} kB", *cells)
    console = Console(width=140)  # piped to a file, rich would cut the table at 80 columns
    console.print(table)
    for name in engines:
        if name != "dense":
            console.print(f"{name}: accuracy {100 * (acc[name] - acc['dense']):+.2f} points vs dense")
    payload = {
        "settings": vars(args) | {"json": str(args.json)},
        "accuracy": acc,
        "params": params,
        "size_bytes": size_bytes,
        "speedup_vs_dense": {n: {str(b): v for b, v in per.items()} for n, per in speedups.items()},
        "s_per_run": {n: {str(b): v for b, v in per.items()} for n, per in times.items()},
    }
    write_result(args.json, payload, ("torch", "onnxruntime", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
