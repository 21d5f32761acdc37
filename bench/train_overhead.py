"""Bar of issue 4: Kiln's trainer step costs <= 3% more than a hand-written PyTorch loop.

Same model, data, batches and optimizer; A, A' and B interleaved in rounds after a warm-up, medians reported:

  A  hand-written: ``x[idx] -> forward -> cross_entropy(mean) -> backward -> AdamW.step -> zero_grad``
  A' the same hand-written loop on a second copy of the model: A'/A is the noise floor of the comparison (two
     copies of one loop differ by where their tensors sit in memory, and by the machine's other work)
  B  ``kiln.train`` Trainer.train_step: the same work through Accelerate (autocast, backward), row-normalised
     accumulation, LR scheduler, resumable sampler and the per-step snapshot an exact resume needs

    python bench/train_overhead.py                      # digits, MLP 64-512-512-10, batch 64, 1 thread
    python bench/train_overhead.py --hidden 128 --batch-size 32 --rounds 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kiln._utils import percentile, write_result
from kiln.data import bundled_dataset
from kiln.train import ShuffledBatchSampler
from kiln.train.accumulate import Batch
from kiln.train.loop import Trainer, make_accelerator


def build(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def hand_written(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Any:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ShuffledBatchSampler(len(x), batch_size, seed=0)

    def step() -> None:
        rows = torch.as_tensor(sampler.next_window(1)[0])
        loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def kiln_trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Any:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def loss_sum(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(batch["x"]), batch["y"], reduction="sum")

    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        ShuffledBatchSampler(len(x), batch_size, seed=0),
        {"x": x, "y": y},
        loss_sum,
        accelerator=make_accelerator("cpu", "no"),
    )
    return trainer.train_step


def timed(step: Any, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="steps per engine per round")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = bundled_dataset("digits")
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    engines = {
        "hand-written": hand_written(build(args.hidden, 0), x, y, args.batch_size),
        "hand-written again": hand_written(build(args.hidden, 0), x, y, args.batch_size),
        "kiln Trainer": kiln_trainer(build(args.hidden, 0), x, y, args.batch_size),
    }
    for step in engines.values():
        timed(step, args.steps)  # warm-up
    per_step: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, step in engines.items():
            per_step[name].append(timed(step, args.steps))
    ratios = [b / a for a, b in zip(per_step["hand-written"], per_step["kiln Trainer"], strict=True)]
    floor = [b / a for a, b in zip(per_step["hand-written"], per_step["hand-written again"], strict=True)]

    table = Table(title=f"train step overhead: digits MLP 64-{args.hidden}-{args.hidden}-10, batch {args.batch_size}")
    for column in ("loop", "median ms/step", "p99 ms/step", "rows/s"):
        table.add_column(column, justify="right" if column != "loop" else "left")
    for name, values in per_step.items():
        med = statistics.median(values)
        table.add_row(name, f"{med * 1e3:.3f}", f"{percentile(values, 99) * 1e3:.3f}", f"{args.batch_size / med:,.0f}")
    overhead = statistics.median(ratios) - 1.0
    noise = statistics.median(floor) - 1.0
    console = Console(width=140)  # piped to a file, rich would cut the table at 80 columns
    console.print(table)
    console.print(
        f"Kiln overhead: {overhead:+.1%} (median of {args.rounds} paired rounds; bar <= +3%); the same loop "
        f"against itself: {noise:+.1%}; threads={args.threads}, {platform.processor() or platform.machine()}"
    )
    result = {
        "settings": vars(args) | {"json": str(args.json)},
        "median_s_per_step": {k: statistics.median(v) for k, v in per_step.items()},
        "rounds_s_per_step": per_step,
        "overhead_median": overhead,
        "hand_written_again_median": noise,
    }
    write_result(args.json, result, ("torch", "accelerate", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
