"""What a run trains on: the model, its batches, its loss, how it is evaluated and exported.

Three kinds: tabular (bundled datasets, CSV: tensors indexed by row), text classification (JSONL: token ids
padded per batch, optionally under a token budget) and embedding fine-tuning (JSONL pairs: anchors and positives
padded together, in-batch negatives). The loop and the runner see only a :class:`Workload`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln import artifact as artifacts
from kiln.config import ExportSettings
from kiln.errors import ConfigError
from kiln.train.accumulate import Batch
from kiln.train.data import TrainData, load_train_data
from kiln.train.distill import distillation_loss_sum, teacher_logits
from kiln.train.models import build_model, check_output_shape, forward_rows
from kiln.train.publish import export_embedding, export_text, export_trained
from kiln.train.sampling import ShuffledBatchSampler, TokenBudgetBatchSampler
from kiln.train.settings import TrainSettings


@dataclass
class Workload:
    model: nn.Module
    sampler: ShuffledBatchSampler | TokenBudgetBatchSampler
    loss_sum: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    export: Callable[[nn.Module, dict[str, Any]], artifacts.Artifact]
    train_rows: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    collate: Callable[[Sequence[int]], Batch] | None = None
    extra_metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_workload(settings: TrainSettings, export_settings: ExportSettings | None) -> Workload:
    if settings.is_embedding:
        return _pairs(settings, export_settings)
    if settings.dataset.lower().endswith(".jsonl"):
        return _text(settings, export_settings)
    return _tabular(settings, export_settings)


def _tabular(settings: TrainSettings, export_settings: ExportSettings | None) -> Workload:
    if settings.max_tokens or settings.lora_rank:
        raise ConfigError(
            f'max_tokens and lora_rank apply to text (.jsonl) datasets; "{settings.dataset}" is tabular: remove them'
        )
    data = load_train_data(
        settings.dataset,
        task=settings.task,
        target=settings.target,
        features=settings.features,
        test_fraction=settings.test_fraction,
        seed=settings.seed,
    )
    seed_everything(settings.seed)
    model = build_model(
        settings.model,
        x_train=data.x_train,
        num_outputs=data.num_outputs,
        task=data.task,
        y_train=data.y_train,
        hidden_sizes=settings.hidden_sizes,
        dropout=settings.dropout,
    )
    with torch.inference_mode():
        probe_rows = data.x_train[: min(4, len(data.x_train))]
        probe = forward_rows(model.eval(), probe_rows, role="model", spec=settings.model)
        check_output_shape(probe, len(probe_rows), data.num_outputs, data.task, data.name)
    tensors = {"x": torch.from_numpy(data.x_train), "y": torch.from_numpy(data.y_train)}
    extra: dict[str, float] = {}
    if settings.teacher:
        if data.task != "classification":
            raise ConfigError(f'distillation needs a classification task; "{data.name}" is {data.task}')
        tensors["teacher"] = teacher_logits(settings.teacher, data.x_train, data.num_outputs, data.labels)
        test_logits = teacher_logits(settings.teacher, data.x_test, data.num_outputs, data.labels)
        extra["teacher_test_accuracy"] = float((test_logits.argmax(1).numpy() == data.y_test).mean())
    return Workload(
        model=model,
        sampler=ShuffledBatchSampler(len(data.x_train), settings.batch_size, seed=settings.seed),
        loss_sum=_tabular_loss(data, settings),
        evaluate=lambda m: evaluate_tabular(m, data),
        export=lambda m, record: export_trained(m, data, settings, export_settings=export_settings, provenance=record),
        train_rows=len(data.x_train),
        tensors=tensors,
        extra_metrics=extra,
    )


def _tabular_loss(data: TrainData, settings: TrainSettings) -> Callable[[nn.Module, Batch], torch.Tensor]:
    if data.task == "regression":
        # MSE of standardised targets: the loss scale (and so the lr) does not depend on the target's units.
        scale = float(max(data.y_train.std(), 1e-6))

        def regression(model: nn.Module, batch: Batch) -> torch.Tensor:
            pred: torch.Tensor = model(batch["x"]).reshape(-1).float()
            return (((pred - batch["y"]) / scale) ** 2).sum()

        return regression
    if settings.teacher:

        def distill(model: nn.Module, batch: Batch) -> torch.Tensor:
            return distillation_loss_sum(
                model(batch["x"]),
                batch["teacher"],
                batch["y"],
                temperature=settings.distill_temperature,
                alpha=settings.distill_alpha,
            )

        return distill

    def classification(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]).float(), batch["y"], reduction="sum")

    return classification


def evaluate_tabular(model: nn.Module, data: TrainData) -> dict[str, float]:
    """Held-out figures: accuracy (classification) or RMSE and R² (regression), in float32 on CPU."""
    model = model.eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(data.x_test)).float()
    if data.task == "classification":
        return {"test_accuracy": float((out.argmax(dim=1).numpy() == data.y_test).mean())}
    pred = out.reshape(-1).numpy()
    residual = float(((pred - data.y_test) ** 2).sum())
    total = float(((data.y_test - data.y_test.mean()) ** 2).sum())
    return {"test_rmse": float(np.sqrt(residual / len(pred))), "test_r2": 1.0 - residual / max(total, 1e-12)}


def _text(settings: TrainSettings, export_settings: ExportSettings | None) -> Workload:
    from kiln.train.text import (
        TextBatcher,
        build_text_model,
        collate_fn,
        encoder_path,
        evaluate_text,
        load_jsonl,
        text_loss_sum,
    )

    if settings.teacher or settings.task == "regression":
        raise ConfigError(
            'text datasets support classification (or task = "embedding" on pairs) without a teacher; '
            "remove teacher / task"
        )
    _check_text_encoder(settings)
    data = load_jsonl(
        Path(settings.dataset), settings.text_column, settings.target or "label", settings.test_fraction, settings.seed
    )
    path = encoder_path(settings.model)
    batcher = TextBatcher(path, settings.max_length)
    ids_train, ids_test = batcher.encode(data.texts_train), batcher.encode(data.texts_test)
    seed_everything(settings.seed)
    model = build_text_model(path, len(data.labels), settings.lora_rank)
    sampler: ShuffledBatchSampler | TokenBudgetBatchSampler
    if settings.max_tokens:
        sampler = TokenBudgetBatchSampler([len(r) for r in ids_train], settings.max_tokens, seed=settings.seed)
    else:
        sampler = ShuffledBatchSampler(len(ids_train), settings.batch_size, seed=settings.seed)
    return Workload(
        model=model,
        sampler=sampler,
        loss_sum=text_loss_sum,
        evaluate=lambda m: {"test_accuracy": evaluate_text(m, ids_test, data.y_test)},
        export=lambda m, record: export_text(
            m, batcher, data, ids_test, settings, export_settings=export_settings, provenance=record
        ),
        train_rows=len(ids_train),
        collate=collate_fn(ids_train, data.y_train),
    )


def _check_text_encoder(settings: TrainSettings) -> None:
    if settings.model in ("mlp", "cnn"):
        raise ConfigError(
            f'model "{settings.model}" takes tabular features; a .jsonl text dataset needs a text encoder: '
            'model = "minilm" (the bundled all-MiniLM-L6-v2) or a local Hugging Face directory'
        )


def _pairs(settings: TrainSettings, export_settings: ExportSettings | None) -> Workload:
    from kiln.train.embedding import collate_pairs, contrastive_loss, load_pairs, retrieval_metrics
    from kiln.train.text import SentenceEncoder, TextBatcher, encoder_path, load_encoder

    _check_text_encoder(settings)
    data = load_pairs(
        settings.dataset, settings.anchor_column, settings.positive_column, settings.test_fraction, settings.seed
    )
    path = encoder_path(settings.model)
    batcher = TextBatcher(path, settings.max_length)
    anchors_train, positives_train = batcher.encode(data.anchors_train), batcher.encode(data.positives_train)
    anchors_test, positives_test = batcher.encode(data.anchors_test), batcher.encode(data.positives_test)
    seed_everything(settings.seed)
    model = SentenceEncoder(load_encoder(path, settings.lora_rank))
    # the untuned encoder's figures, so the result shows what fine-tuning changed (LoRA starts as a no-op)
    base = retrieval_metrics(model, anchors_test, positives_test)
    return Workload(
        model=model,
        sampler=ShuffledBatchSampler(len(anchors_train), settings.batch_size, seed=settings.seed),
        loss_sum=contrastive_loss(settings.similarity_scale),
        evaluate=lambda m: {f"test_{k}": v for k, v in retrieval_metrics(m, anchors_test, positives_test).items()},
        export=lambda m, record: export_embedding(
            m, path, settings, export_settings=export_settings, provenance=record
        ),
        train_rows=len(anchors_train),
        collate=collate_pairs(anchors_train, positives_train),
        extra_metrics={f"base_{k}": v for k, v in base.items()},
    )
