"""Does bf16 autocast help training on this CPU? fp32 vs ``mixed_precision = "bf16"`` through Kiln's Trainer.

bf16 pays off on CPUs with native bf16 matrix units (AVX512-BF16, AMX); elsewhere the casts cost more than the
narrower math saves. This measures it instead of assuming: for each model, fresh fp32 and bf16 trainers
(same init, same batches) take turns in rounds after a warm-up; medians and the bf16/fp32 speed ratio reported.

    python bench/train_precision.py
    python bench/train_precision.py --rounds 9 --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kiln._utils import percentile, write_result
from kiln.data import bundled_dataset
from kiln.runtime import probe
from kiln.train import ShuffledBatchSampler
from kiln.train.accumulate import Batch
from kiln.train.loop import Trainer, make_accelerator
from kiln.train.models import cnn, mlp

MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "digits CNN 32-64ch, batch 256": (lambda: cnn(64, (32, 64), 10), 256),
    "digits MLP 64-1024-1024-10, batch 256": (lambda: mlp(64, (1024, 1024), 10), 256),
}


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]).float(), batch["y"], reduction="sum")


def make_trainer(build: Callable[[], nn.Module], precision: str, batch_size: int, x: Any, y: Any) -> Trainer:
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sampler = ShuffledBatchSampler(len(x), batch_size, seed=0)
    # NOTE: Accelerate's precision is process-wide; each trainer is built right before its turn.
    return Trainer(
        model, optimizer, scheduler, sampler, {"x": x, "y": y}, loss_sum, accelerator=make_accelerator("cpu", precision)
    )


def timed(trainer: Trainer, steps: int) -> float:
    trainer.train_step()  # first step of a fresh trainer: allocations
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = bundled_dataset("digits")
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    hardware = probe()

    table = Table(title="training step, fp32 vs bf16 autocast (CPU)")
    for column in ("model", "fp32 ms/step", "bf16 ms/step", "bf16 p99", "bf16 speed vs fp32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    results: dict[str, Any] = {}
    for name, (build, batch_size) in MODELS.items():
        times: dict[str, list[float]] = {"no": [], "bf16": []}
        for precision in times:  # warm-up
            timed(make_trainer(build, precision, batch_size, x, y), args.steps)
        for _ in range(args.rounds):
            for precision, values in times.items():
                values.append(timed(make_trainer(build, precision, batch_size, x, y), args.steps))
        ratio = statistics.median(a / b for a, b in zip(times["no"], times["bf16"], strict=True))
        results[name] = {"s_per_step": times, "bf16_speedup_median": ratio}
        table.add_row(
            name,
            f"{statistics.median(times['no']) * 1e3:.2f}",
            f"{statistics.median(times['bf16']) * 1e3:.2f}",
            f"{percentile(times['bf16'], 99) * 1e3:.2f}",
            f"{ratio:.2f}x",
        )
    console = Console(width=140)  # piped to a file, rich would cut the table at 80 columns
    console.print(table)
    console.print(f"cpu: {hardware.get('cpu')}; flags: {hardware.get('isa')}; threads={args.threads}")
    payload = {"settings": vars(args) | {"json": str(args.json)}, "results": results, "hardware": hardware}
    write_result(args.json, payload, ("torch", "accelerate", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
