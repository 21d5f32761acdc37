"""The optimiser and the learning-rate schedule a run (and a fine-tune after pruning) steps with."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kiln.train.settings import TrainSettings


def make_optimizer(model: nn.Module, settings: TrainSettings, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, at ``lr`` (default ``settings.lr``)."""
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: only the adapters and the head
    lr = settings.lr if lr is None else lr
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)


def lr_schedule(settings: TrainSettings, total_steps: int) -> Callable[[int], float]:
    """The lr factor at each step: linear warm-up, then constant, cosine or linear decay to ``total_steps``."""
    warmup, kind = settings.warmup_steps, settings.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor
