"""Structured pruning + fine-tuning: smaller tensors, and how much faster in ONNX Runtime (measured).

A model is trained and exported (dense); then the same run is resumed from its last checkpoint with
``prune_ratio`` set, so each pruned variant starts from the very same dense weights, is pruned (ranked by L1
norm), fine-tuned and exported. All artifacts are timed in ONNX Runtime (1 thread), interleaved in rounds after a
warm-up, at each batch size; medians, and the median of per-round ratios.

  --model cnn     digits, a CNN (conv channels pruned); timed on the held-out rows
  --model minilm  the bundled MiniLM with a classification head, fine-tuned to tell four groups of Python's help
                  topics apart (strings, errors, control flow, containers: real English paragraphs); attention
                  heads and FFN width pruned in every layer. Timed on other real paragraphs (the English corpus),
                  tokenized once: batch 1 over single paragraphs, larger batches over length-sorted batches

    python bench/train_prune.py
    python bench/train_prune.py --ratios 0.5,0.75 --batch-sizes 1,64,450 --importance taylor
    python bench/train_prune.py --model minilm     # writes bench/results/train_prune_minilm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kiln._utils import write_result
from kiln.artifact import Artifact
from kiln.config import ExportSettings
from kiln.data import english_corpus, eval_set, topic_paragraphs
from kiln.runtime import OrtEngine, TextTokenizer, tokenizer_for
from kiln.runtime.text import sorted_batches
from kiln.train import TrainSettings, train
from kiln.types import Feeds

# MiniLM's task: which group of Python's help topics a paragraph comes from
TOPIC_GROUPS = {
    "strings": ("string-methods", "formatstrings", "strings"),
    "errors": ("exceptions", "try", "raise", "assert"),
    "control flow": ("if", "while", "for", "break", "continue", "with", "compound"),
    "containers": ("dict", "lists", "typesseq", "typesseq-mutable", "typesmapping", "sequence-types"),
}
TIMING_TEXTS = 256  # corpus paragraphs the MiniLM variants are timed on


def timed(engine: OrtEngine, batches: list[Feeds], repeats: int) -> float:
    """Seconds for one pass over ``batches``, the mean of ``repeats`` passes."""
    started = time.perf_counter()
    for _ in range(repeats):
        for feeds in batches:
            engine.run(feeds)
    return (time.perf_counter() - started) / repeats


def write_topics(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for text, label in topic_paragraphs(TOPIC_GROUPS):
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def base_settings(args: argparse.Namespace, tmp: str) -> TrainSettings:
    common: dict[str, Any] = {
        "track": False,
        "out": f"{tmp}/repo",
        "checkpoint_every": 0,
        "checkpoint_dir": f"{tmp}/ck",
        "name": "dense",
        "epochs": args.epochs,
    }
    if args.model == "minilm":
        data = write_topics(Path(tmp) / "topics.jsonl")
        return TrainSettings(
            dataset=str(data), model="minilm", max_length=128, max_tokens=2048, lr=5e-5, schedule="linear", **common
        )
    return TrainSettings(
        dataset="digits",
        model="cnn",
        hidden_sizes=tuple(int(w) for w in args.widths.split(",")),
        lr=3e-3,
        schedule="cosine",
        **common,
    )


def timing_batches(model: str, art: Artifact, engine: OrtEngine, sizes: list[int]) -> dict[int, list[Feeds]]:
    """What each batch size runs on ``art`` (its ``engine``): held-out digits rows, or tokenized corpus paragraphs."""
    if model == "cnn":
        held_out = eval_set(art)
        assert held_out.feeds is not None
        x = held_out.feeds["input"]
        return {b: [{"input": np.ascontiguousarray(x[:b])}] for b in sizes}
    tokenizer = tokenizer_for(art)
    assert tokenizer is not None
    names = [spec.name for spec in engine.inputs]
    ids = tokenizer.encode(english_corpus(TIMING_TEXTS))
    batches: dict[int, list[Feeds]] = {}
    for b in sizes:
        order = sorted_batches([len(row) for row in ids], b) if b > 1 else [np.array([i]) for i in range(64)]
        batches[b] = [TextTokenizer.pad([ids[i] for i in index], names) for index in order]
    return batches


def accuracy(model: str, runs: dict[str, Any], engines: dict[str, OrtEngine], art: Artifact) -> dict[str, float]:
    """Held-out accuracy: of the ONNX model on digits; the trainer's held-out split for MiniLM."""
    if model == "cnn":
        held_out = eval_set(art)
        assert held_out.feeds is not None and held_out.labels is not None
        x, y = held_out.feeds["input"], held_out.labels
        return {n: float((e.run({"input": x})["logits"].argmax(axis=1) == y).mean()) for n, e in engines.items()}
    return {name: float(run.metrics["test_accuracy"]) for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn", choices=["cnn", "minilm"])
    parser.add_argument("--ratios", default=None, help="default 0.5,0.75 (cnn), 0.5 (minilm)")
    parser.add_argument("--importance", default="l1", choices=["l1", "taylor"])
    parser.add_argument("--widths", default="32,64", help="the dense CNN's conv channels")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (cnn), 3 (minilm)")
    parser.add_argument("--prune-epochs", type=int, default=None, help="default 5 (cnn), 3 (minilm)")
    parser.add_argument("--batch-sizes", default=None, help="default 1,64,450 (cnn), 1,32 (minilm)")
    parser.add_argument("--rounds", type=int, default=None, help="default 15 (cnn), 7 (minilm)")
    parser.add_argument("--repeats", type=int, default=None, help="default 50 (cnn), 1 (minilm)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    defaults: dict[str, Any] = {
        "cnn": {"ratios": "0.5,0.75", "epochs": 20, "prune_epochs": 5, "batch_sizes": "1,64,450", "rounds": 15,
                "repeats": 50, "json": Path("bench/results/train_prune.json")},
        "minilm": {"ratios": "0.5", "epochs": 3, "prune_epochs": 3, "batch_sizes": "1,32", "rounds": 7,
                   "repeats": 1, "json": Path("bench/results/train_prune_minilm.json")},
    }[args.model]  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        base = base_settings(args, tmp)
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
        acc = accuracy(args.model, runs, engines, arts["dense"])
        inputs = timing_batches(args.model, arts["dense"], engines["dense"], sizes)
        times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in sizes} for name in engines}
        for batch in sizes:
            for engine in engines.values():
                timed(engine, inputs[batch], args.repeats)  # warm-up
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    times[name][batch].append(timed(engine, inputs[batch], args.repeats))
        size_bytes = {name: a.manifest.model["size_bytes"] for name, a in arts.items()}
        params = {name: run.metrics.get("params", float("nan")) for name, run in runs.items()}
        params["dense"] = runs[next(iter(runs.keys() - {"dense"}))].metrics["params_dense"] if ratios else 0.0

    what = f"digits CNN {args.widths}" if args.model == "cnn" else "MiniLM topic classifier"
    unit = "µs" if args.model == "cnn" else "ms a pass"
    table = Table(title=f"{what}: pruned + fine-tuned vs dense in ONNX Runtime (1 thread)")
    for column in ("model", "accuracy", "params", "onnx size"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for batch in sizes:
        table.add_column(f"batch {batch} {unit}", justify="right")
        table.add_column("speed-up", justify="right")
    speedups: dict[str, dict[int, float]] = {}
    for name in engines:
        speedups[name] = {
            b: statistics.median(d / p for d, p in zip(times["dense"][b], times[name][b], strict=True)) for b in sizes
        }
        cells = [
            cell
            for b in sizes
            for cell in (
                f"{statistics.median(times[name][b]) * (1e6 if args.model == 'cnn' else 1e3):.1f}",
                f"{speedups[name][b]:.2f}x",
            )
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
        "s_per_pass": {n: {str(b): v for b, v in per.items()} for n, per in times.items()},
        "pass": "cnn: one run of the batch; minilm: 64 paragraphs one by one (batch 1), or 256 in sorted batches",
    }
    write_result(args.json, payload, ("torch", "onnxruntime", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
