"""Model factories the tests pass as ``model = "kiln_train_test_models:..."`` (this folder goes on the path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

SLEEP_S = 0.003


class Sleep(nn.Module):
    """Slows each forward down, so a test can kill a run part-way through without racing it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLEEP_S)
        return x


def slow_digits_mlp() -> nn.Module:
    """64 -> 32 -> 10 with dropout, so an exact resume must also restore the RNG that dropout draws from."""
    return nn.Sequential(Sleep(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


def three_class_head() -> nn.Module:
    """A model with 3 outputs: wrong for digits' 10 classes."""
    return nn.Linear(64, 3)


def not_a_module() -> object:
    return {"weights": [1, 2, 3]}


class RankProbe(nn.Module):
    """Writes the first 8 draws of the first training forward to ``$KILN_TEST_PROBE_DIR/rank-$RANK.txt``: what
    dropout would draw on that rank."""

    def __init__(self) -> None:
        super().__init__()
        self.written = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.written:
            self.written = True
            draws = torch.rand(8).tolist()
            probe = Path(os.environ["KILN_TEST_PROBE_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.txt"
            probe.write_text(" ".join(f"{d:.8f}" for d in draws), encoding="utf-8")
        return x


def probed_digits_mlp() -> nn.Module:
    return nn.Sequential(RankProbe(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


class TwoLayers(nn.Module):
    """64 -> 16 -> 10 as a plain module, not an nn.Sequential: a structure pruning does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def two_layer_digits_module() -> nn.Module:
    return TwoLayers()
