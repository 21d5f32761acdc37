"""Prune a trained model, then fine-tune the smaller one with the same :class:`Trainer` (and its loss)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from kiln.train.accumulate import Batch
from kiln.train.loop import Sampler, StepStats, Trainer
from kiln.train.optim import lr_schedule, make_optimizer
from kiln.train.prune import PruneReport, prune_model
from kiln.train.settings import TrainSettings
from kiln.train.workload import Workload

logger = logging.getLogger(__name__)


def prune_and_finetune(
    model: nn.Module,
    work: Workload,
    settings: TrainSettings,
    *,
    sampler: Sampler,
    accelerator: Any,
    step_offset: int,
    on_step: Callable[[StepStats], None] | None = None,
) -> tuple[nn.Module, PruneReport, int]:
    """Prune ``model`` (on CPU, in place) by ``settings.prune_ratio`` and fine-tune it for ``prune_epochs``.

    ``sampler`` is a fresh sampler over the training rows (the fine-tune walks its own epochs); steps are
    reported to ``on_step`` numbered after ``step_offset`` (the dense run's steps). Returns the fine-tuned
    model (on CPU, float32), what pruning removed and the number of fine-tune steps.
    """
    report = prune_model(
        model,
        settings.prune_ratio,
        importance=settings.prune_importance,
        loss_sum=work.loss_sum,
        batches=_batches(work, sampler, settings.prune_batches),
    )
    logger.info(
        "pruned %.0f%% of each layer's units: %d -> %d parameters",
        100 * settings.prune_ratio,
        report.params_before,
        report.params_after,
    )
    steps = sampler.optimizer_steps(settings.prune_epochs, settings.grad_accum_steps)
    if steps == 0:
        return model, report, 0
    optimizer = make_optimizer(model, settings, lr=settings.prune_lr or settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, steps))
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        sampler,
        work.tensors,
        work.loss_sum,
        accelerator=accelerator,
        collate=work.collate,
        grad_accum_steps=settings.grad_accum_steps,
        optimizer_kind=settings.optimizer,
    )

    def shifted(stats: StepStats) -> None:
        if on_step is not None:
            total = stats.total_steps + step_offset
            on_step(dataclasses.replace(stats, step=stats.step + step_offset, total_steps=total))

    trainer.fit(steps, on_step=shifted)
    tuned: nn.Module = trainer.trained_model()
    return tuned, report, trainer.step


def _batches(work: Workload, sampler: Sampler, count: int) -> Iterator[Batch]:
    """The first ``count`` batches of the sampler's first epoch (for gradient-based importance)."""
    for rows in sampler.epoch_batches(0)[:count]:
        if work.collate is not None:
            yield work.collate(rows)
        else:
            index = torch.as_tensor(rows, dtype=torch.long)
            yield {k: v[index] for k, v in work.tensors.items()}
