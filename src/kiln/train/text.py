"""Text models: a JSONL file, a local Hugging Face encoder (the bundled MiniLM), optional LoRA.

Rows are tokenised once; each batch is padded only to its own longest row, so with the token-budget sampler
(``max_tokens``) a batch of short texts holds many rows and a batch of long ones few. The loss is summed per
row and divided by the rows of the whole accumulation window, so batches of different sizes weigh each row
the same. LoRA adapters (through PEFT) are merged into the base weights before export: the artifact is a plain
encoder + head (:class:`TextClassifier`), or a plain sentence embedder (:class:`SentenceEncoder`, trained on
pairs by :mod:`kiln.train.embedding`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.data import split_rows
from kiln.errors import ConfigError, InvalidInput, KilnError, ModelNotFound, did_you_mean
from kiln.train.accumulate import Batch
from kiln.train.data import read_utf8

logger = logging.getLogger(__name__)

BUNDLED_ENCODERS = ("minilm",)
PEFT_INSTALL_HINT = 'pip install "peft>=0.13"'


@dataclass(frozen=True)
class TextData:
    """Texts with int64 class ids, split into train and test."""

    name: str
    texts_train: list[str]
    y_train: np.ndarray[Any, Any]
    texts_test: list[str]
    y_test: np.ndarray[Any, Any]
    labels: tuple[str, ...]


def read_jsonl(path: Path, keys: Sequence[str], fix: str) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file (blank lines skipped), each checked to hold every one of ``keys``.

    ``fix`` names the settings that choose the keys (e.g. ``"set text_column / target"``): a missing key is
    reported with its line, the closest key of that row, the row's keys and that fix.
    """
    if not path.is_file():
        raise InvalidInput(f'dataset file "{path}" does not exist; pass an existing .jsonl file', path=str(path))
    example = ", ".join(f'"{k}": ...' for k in keys)
    # NOTE: split on "\n" only, as a file's lines are: splitlines() would also cut at a U+2028 inside a string
    lines = read_utf8(path).split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f'"{path}" line {number} is not valid JSON ({exc.msg} at column {exc.colno}: '
                f"{line.strip()[:60]!r}); each line must be one JSON object like {{{example}}}: fix the line or "
                "remove it",
                line=number,
            ) from exc
        if not isinstance(row, dict):
            raise InvalidInput(
                f'"{path}" line {number} is a JSON {type(row).__name__}, not an object like {{{example}}}',
                line=number,
            )
        for key in keys:
            if key not in row:
                raise InvalidInput(
                    f'"{path}" line {number} has no key "{key}"{did_you_mean(key, row)}; its keys are '
                    f"{', '.join(row)} ({fix})",
                    line=number,
                    key=key,
                )
            value = row[key]
            if value is None or isinstance(value, dict | list):
                # NOTE: str() would make null the text (or class) "None", and an array its repr, silently
                shown = "null" if value is None else f"a JSON {'object' if isinstance(value, dict) else 'array'}"
                raise InvalidInput(
                    f'"{path}" line {number} has {shown} under "{key}"; it must be a string or a number: fix the '
                    "row or drop it",
                    line=number,
                    key=key,
                )
        rows.append(row)
    return rows


def load_jsonl(path: Path, text_column: str, target: str, test_fraction: float, seed: int) -> TextData:
    """Rows of ``{"<text_column>": "...", "<target>": label}``; clear errors for missing keys or bad lines."""
    rows = read_jsonl(path, (text_column, target), "set text_column / target")
    texts = [str(row[text_column]) for row in rows]
    raw_labels = [str(row[target]) for row in rows]
    if len(texts) < 4:
        raise InvalidInput(f'"{path}" has {len(texts)} rows; training needs at least 4', path=str(path))
    labels = tuple(sorted(set(raw_labels)))
    if len(labels) < 2:
        raise InvalidInput(
            f'every row of "{path}" has the label {labels[0]!r} under "{target}"; a classifier needs at least 2 '
            "classes (it would learn to answer that one always); check the target key, or the rows kept",
            path=str(path),
            key=target,
        )
    y = np.asarray([labels.index(v) for v in raw_labels], dtype=np.int64)
    stratify = y if np.bincount(y).min() >= 2 else None
    index_train, index_test = split_rows(len(texts), test_fraction, seed, stratify)
    return TextData(
        path.stem,
        [texts[i] for i in index_train],
        y[index_train],
        [texts[i] for i in index_test],
        y[index_test],
        labels,
    )


def encoder_path(spec: str) -> Path:
    """``"minilm"`` -> the bundled all-MiniLM-L6-v2 directory; otherwise a local Hugging Face directory."""
    if spec in BUNDLED_ENCODERS:
        from kiln.export import bundled_minilm_path

        return Path(bundled_minilm_path())
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f'"{spec}" is not a Hugging Face model directory (no config.json); for text use model = "minilm" or a '
            "local directory with config.json, the weights and tokenizer.json",
            path=spec,
        )
    return path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real (unmasked) tokens' states: ``(B, T, H), (B, T) -> (B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)


class TextClassifier(nn.Module):
    """Encoder -> mean pooling over real tokens -> linear head: ``(input_ids, attention_mask) -> logits``."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        out: torch.Tensor = self.head(mean_pool(hidden, attention_mask))  # (B, C)
        return out


class SentenceEncoder(nn.Module):
    """Encoder -> mean pooling -> L2 normalisation (sentence-transformers' recipe): ``-> (B, H)`` unit vectors.

    The same computation ``kiln export`` puts into the graph of a Hugging Face directory, so a fine-tuned
    encoder saved as a directory exports to the vectors this module computes.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return nn.functional.normalize(mean_pool(hidden, attention_mask), p=2.0, dim=1)


def load_encoder(path: Path, lora_rank: int) -> Any:
    """The encoder at ``path`` (eager attention: the graph ORT fuses), wrapped with LoRA adapters when asked."""
    from kiln.export import load_hf_encoder

    encoder = load_hf_encoder(path)
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:
        # NOTE: mean pooling never reads BERT's pooler; trainable, it would get no gradient, and DDP (--nproc)
        # would stop at the next step waiting for it ("Expected to have finished reduction in the prior iteration")
        pooler.requires_grad_(False)
    if lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise KilnError(f"lora_rank needs PEFT, which is not installed; {PEFT_INSTALL_HINT}") from exc
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["query", "value"])
        with warnings.catch_warnings():
            # NOTE: peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            encoder = get_peft_model(encoder, config)
        trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        logger.info("LoRA rank %d: %d trainable encoder parameters", lora_rank, trainable)
    return encoder


def build_text_model(path: Path, num_labels: int, lora_rank: int) -> TextClassifier:
    """The encoder at ``path`` with a classification head; LoRA adapters when asked."""
    encoder = load_encoder(path, lora_rank)
    return TextClassifier(encoder, int(encoder.config.hidden_size), num_labels)


def merge_lora(model: TextClassifier | SentenceEncoder) -> TextClassifier | SentenceEncoder:
    """Fold LoRA adapters into the base weights (a no-op without them): the exported graph has no adapters."""
    merge = getattr(model.encoder, "merge_and_unload", None)
    if merge is not None:
        model.encoder = merge()
    return model


def _max_positions(path: Path) -> int | None:
    """The encoder's position-embedding count from its ``config.json``, or None when it does not say."""
    try:
        value = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


class TextBatcher:
    """Tokenises texts once; ``collate(rows)`` pads the chosen rows to their own longest row."""

    def __init__(self, path: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelNotFound(f'"{path}" has no tokenizer.json (a fast tokenizer is needed)', path=str(path))
        positions = _max_positions(path)
        if positions is not None and max_length > positions:  # a long row crashed the run when a batch held it
            raise ConfigError(
                f'max_length is {max_length}, but the encoder at "{path}" has {positions} positions '
                f"(max_position_embeddings in its config.json); set max_length <= {positions}",
                setting="max_length",
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer_file = tokenizer_file
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

    @staticmethod
    def pad(ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_fn(ids: list[list[int]], labels: np.ndarray[Any, Any]) -> Any:
    y = torch.from_numpy(labels)

    def collate(rows: Sequence[int]) -> Batch:
        return TextBatcher.pad([ids[i] for i in rows]) | {"y": y[torch.as_tensor(rows, dtype=torch.long)]}

    return collate


def text_loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"]).float()
    return nn.functional.cross_entropy(logits, batch["y"], reduction="sum")


def evaluate_text(model: nn.Module, ids: list[list[int]], labels: np.ndarray[Any, Any], batch: int = 64) -> float:
    """Held-out accuracy, in length-sorted batches (little padding)."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            feeds = TextBatcher.pad([ids[i] for i in rows])
            predicted = model(feeds["input_ids"], feeds["attention_mask"]).argmax(dim=1).numpy()
            correct += int((predicted == labels[rows]).sum())
    return correct / len(ids)
