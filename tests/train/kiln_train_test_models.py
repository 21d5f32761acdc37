"""Model factories the tests pass as ``model = "kiln_train_test_models:..."`` (this folder goes on the path)."""

from __future__ import annotations

import time

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
