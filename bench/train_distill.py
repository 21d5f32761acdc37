"""Bar of issue 4: a distilled student runs >= 2x faster than its teacher in ONNX Runtime, <= 1 point less accurate.

On digits: a teacher CNN is trained and exported, then a small MLP student learns from the teacher *artifact*
(its logits through ONNX Runtime) and is exported too. Both artifacts are timed in ONNX Runtime on the held-out
rows, interleaved in rounds after a warm-up, at each batch size; medians reported with held-out accuracy.

    python bench/train_distill.py
    python bench/train_distill.py --student-width 32 --batch-sizes 1,64,450
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


def accuracy(engine: OrtEngine, x: np.ndarray, y: np.ndarray) -> float:  # type: ignore[type-arg]
    return float((engine.run({"input": x})["logits"].argmax(axis=1) == y).mean())


def timed(engine: OrtEngine, x: np.ndarray, repeats: int) -> float:  # type: ignore[type-arg]
    started = time.perf_counter()
    for _ in range(repeats):
        engine.run({"input": x})
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-width", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,64,450")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_distill.json"))
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        common = {"dataset": "digits", "track": False, "out": f"{tmp}/repo", "checkpoint_every": 0}
        export = ExportSettings(exporter="torchscript")
        teacher = train(
            TrainSettings(
                name="teacher",
                model="cnn",
                hidden_sizes=(32, 64),
                epochs=20,
                lr=3e-3,
                schedule="cosine",
                checkpoint_dir=f"{tmp}/ck-t",
                **common,
            ),
            export_settings=export,
        )
        assert teacher.artifact is not None
        student = train(
            TrainSettings(
                name="student",
                hidden_sizes=(args.student_width,),
                epochs=60,
                lr=5e-3,
                teacher=str(teacher.artifact.path),
                distill_temperature=4.0,
                distill_alpha=0.7,
                checkpoint_dir=f"{tmp}/ck-s",
                **common,
            ),
            export_settings=export,
        )
        assert student.artifact is not None
        alone = train(  # the same student without the teacher: what distillation adds
            TrainSettings(
                name="student-alone",
                hidden_sizes=(args.student_width,),
                epochs=60,
                lr=5e-3,
                checkpoint_dir=f"{tmp}/ck-a",
                export=False,
                **common,
            )
        )
        arts: dict[str, Artifact] = {"teacher (CNN)": teacher.artifact, "student (MLP)": student.artifact}
        engines = {name: OrtEngine(a.model_path, intra_op_threads=1) for name, a in arts.items()}
        held_out = eval_set(teacher.artifact)
        assert held_out.feeds is not None and held_out.labels is not None
        x, y = held_out.feeds["input"], held_out.labels
        acc = {name: accuracy(engine, x, y) for name, engine in engines.items()}
        times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in sizes} for name in engines}
        for batch in sizes:
            rows = np.ascontiguousarray(x[:batch])
            for engine in engines.values():
                timed(engine, rows, args.repeats)  # warm-up
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    times[name][batch].append(timed(engine, rows, args.repeats))
        sizes_bytes = {name: a.manifest.model["size_bytes"] for name, a in arts.items()}

    table = Table(title="digits: distilled student vs teacher in ONNX Runtime (1 thread)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("size", justify="right")
    for batch in sizes:
        table.add_column(f"batch {batch} µs", justify="right")
    for name in engines:
        cells = [f"{statistics.median(times[name][b]) * 1e6:.1f}" for b in sizes]
        table.add_row(name, f"{acc[name]:.4f}", f"{sizes_bytes[name] / 1e3:.1f} kB", *cells)
    console = Console(width=140)  # piped to a file, rich would cut the table at 80 columns
    console.print(table)
    t, s = list(engines)
    for batch in sizes:
        speedup = statistics.median(a / b for a, b in zip(times[t][batch], times[s][batch], strict=True))
        console.print(f"batch {batch}: student {speedup:.2f}x faster (bar >= 2x)")
    console.print(f"accuracy: student {100 * (acc[s] - acc[t]):+.2f} points vs teacher (bar >= -1)")
    alone_accuracy = alone.metrics["test_accuracy"]
    console.print(f"the same student trained without the teacher: {alone_accuracy:.4f}")
    payload = {
        "settings": vars(args) | {"json": str(args.json)},
        "accuracy": acc | {"student without teacher": alone.metrics["test_accuracy"]},
        "size_bytes": sizes_bytes,
        "s_per_run": {n: {str(b): v for b, v in per.items()} for n, per in times.items()},
    }
    write_result(args.json, payload, ("torch", "onnxruntime", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
