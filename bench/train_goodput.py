"""Bar of issue 4: a goodput-sized batch reaches the same held-out accuracy >= 1.3x faster than a fixed batch.

Three ways to train the same digits MLP through ``kiln.train.train`` (no export, no tracking):

  fixed-small  batch 8 the whole run (good statistical efficiency, poor hardware efficiency)
  fixed-large  batch 256 the whole run, lr scaled by sqrt(32) (the opposite)
  adaptive     starts at 8, the goodput sizer doubles it while progress per second rises (up to 256)

Each is run for several epoch budgets, interleaved, ``--rounds`` times; the table gives the median wall time
and accuracy per budget and the first budget whose median accuracy reaches ``--target``.

    python bench/train_goodput.py --epochs 2,4,8,16,32
    python bench/train_goodput.py --epochs 2,4,8,16 --target 0.975 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kiln._utils import package_versions
from kiln.train import TrainSettings, train

CONFIGS: dict[str, dict[str, Any]] = {
    "fixed-small": {"batch_size": 8, "lr": 1e-3},
    "fixed-large": {"batch_size": 256, "lr": 1e-3 * math.sqrt(32)},
    "adaptive": {"batch_size": 8, "lr": 1e-3, "adaptive_batch": True, "max_batch_size": 256},
}


def run(config: dict[str, Any], epochs: int, workdir: Path) -> tuple[float, float]:
    settings = TrainSettings(
        dataset="digits",
        hidden_sizes=(256,),
        epochs=epochs,
        track=False,
        export=False,
        checkpoint_every=0,
        checkpoint_dir=tempfile.mkdtemp(dir=workdir),
        **config,
    )
    started = time.perf_counter()
    result = train(settings)
    return time.perf_counter() - started, result.metrics["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="2,4,8,16,32")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_goodput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(e) for e in args.epochs.split(",")]

    figures: dict[str, dict[int, dict[str, list[float]]]] = {
        n: {e: {"s": [], "acc": []} for e in budgets} for n in CONFIGS
    }
    with tempfile.TemporaryDirectory() as tmp:
        run(CONFIGS["fixed-small"], 1, Path(tmp))  # warm-up: imports, allocator
        for _ in range(args.rounds):
            for epochs in budgets:
                for name, config in CONFIGS.items():
                    seconds, accuracy = run(config, epochs, Path(tmp))
                    figures[name][epochs]["s"].append(seconds)
                    figures[name][epochs]["acc"].append(accuracy)

    table = Table(title=f"digits MLP 64-256-10: wall time and held-out accuracy (median of {args.rounds})")
    table.add_column("config")
    for epochs in budgets:
        table.add_column(f"{epochs} ep", justify="right")
    table.add_column(f"time to >= {args.target:.3f}", justify="right")
    time_to_target: dict[str, float | None] = {}
    for name in CONFIGS:
        cells, reached = [], None
        for epochs in budgets:
            s, acc = statistics.median(figures[name][epochs]["s"]), statistics.median(figures[name][epochs]["acc"])
            cells.append(f"{s:.2f}s / {acc:.3f}")
            if reached is None and acc >= args.target:
                reached = s
        time_to_target[name] = reached
        table.add_row(name, *cells, f"{reached:.2f}s" if reached is not None else "not reached")
    console = Console()
    console.print(table)
    adaptive = time_to_target["adaptive"]
    for fixed in ("fixed-small", "fixed-large"):
        baseline = time_to_target[fixed]
        if baseline is not None and adaptive is not None:
            console.print(f"adaptive vs {fixed}, time to {args.target:.3f}: {baseline / adaptive:.2f}x (bar >= 1.3x)")
        else:
            console.print(f"adaptive vs {fixed}: not comparable (one of them never reached {args.target:.3f})")
    payload = {
        "settings": vars(args) | {"json": str(args.json)},
        "configs": CONFIGS,
        "figures": {n: {str(e): v for e, v in per.items()} for n, per in figures.items()},
        "time_to_target_s": time_to_target,
        "versions": package_versions("torch", "accelerate", "kiln"),
        "machine": platform.platform(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
