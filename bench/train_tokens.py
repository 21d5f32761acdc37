"""Bar of issue 4: token-budget batching trains >= 1.5x more real tokens/s than padded fixed-size batches.

MiniLM (bundled all-MiniLM-L6-v2) + classification head, full fine-tuning, through Kiln's Trainer, on real
English paragraphs (Python's help topics) truncated to ``--max-length`` tokens. Two samplers with the same
worst-case memory (``max_tokens = batch_size x max_length``):

  fixed   ``batch_size`` random rows per batch, padded to the batch's longest row
  budget  ``TokenBudgetBatchSampler``: length-bucketed rows packed up to ``max_tokens`` padded tokens

Both take turns in rounds of ``--steps`` steps after a warm-up; real (non-padding) tokens per second, medians.

    python bench/train_tokens.py
    python bench/train_tokens.py --texts 1000 --steps 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kiln._utils import write_result
from kiln.data import english_corpus
from kiln.train import ShuffledBatchSampler, TokenBudgetBatchSampler
from kiln.train.loop import Trainer, make_accelerator
from kiln.train.text import TextBatcher, build_text_model, collate_fn, encoder_path, text_loss_sum


def make_trainer(sampler: ShuffledBatchSampler | TokenBudgetBatchSampler, ids: list[list[int]]) -> Trainer:
    torch.manual_seed(0)
    model = build_text_model(encoder_path("minilm"), 2, lora_rank=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    labels = np.asarray([len(r) % 2 for r in ids], dtype=np.int64)  # the task does not matter for speed
    return Trainer(
        model,
        optimizer,
        scheduler,
        sampler,
        {},
        text_loss_sum,
        accelerator=make_accelerator("cpu", "no"),
        collate=collate_fn(ids, labels),
    )


def timed(trainer: Trainer, ids: list[list[int]], steps: int) -> float:
    """Real tokens per second over ``steps`` steps."""
    tokens = 0
    started = time.perf_counter()
    for _ in range(steps):
        position = trainer.sampler.position
        batches = trainer.sampler.epoch_batches(trainer.sampler.epoch)
        tokens += sum(len(ids[i]) for i in batches[position])
        trainer.train_step()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_tokens.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batcher = TextBatcher(encoder_path("minilm"), args.max_length)
    ids = batcher.encode(english_corpus(args.texts))
    budget = args.batch_size * args.max_length
    trainers = {
        f"fixed {args.batch_size} rows": make_trainer(ShuffledBatchSampler(len(ids), args.batch_size, seed=0), ids),
        f"budget {budget} tokens": make_trainer(TokenBudgetBatchSampler([len(r) for r in ids], budget, seed=0), ids),
    }
    for trainer in trainers.values():
        timed(trainer, ids, 1)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            rates[name].append(timed(trainer, ids, args.steps))
    names = list(trainers)
    ratio = statistics.median(b / a for a, b in zip(rates[names[0]], rates[names[1]], strict=True))

    table = Table(title=f"MiniLM fine-tuning, {len(ids)} real paragraphs, max_length {args.max_length}")
    table.add_column("batching")
    table.add_column("real tokens/s (median)", justify="right")
    for name, values in rates.items():
        table.add_row(name, f"{statistics.median(values):,.0f}")
    console = Console(width=140)  # piped to a file, rich would cut the table at 80 columns
    console.print(table)
    console.print(f"token budget vs fixed: {ratio:.2f}x real tokens/s (bar >= 1.5x); threads={args.threads}")
    payload = {
        "settings": vars(args) | {"json": str(args.json)},
        "tokens_per_s": rates,
        "ratio_median": ratio,
    }
    write_result(args.json, payload, ("torch", "transformers", "accelerate", "kiln"))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
