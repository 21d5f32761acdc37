"""Embedding fine-tuning on text pairs: in-batch negatives, retrieval metrics, and real pairs with no download.

Each row is an ``(anchor, positive)`` pair. A batch of B pairs is one forward pass over 2B texts (the anchors,
then their positives, padded together); the loss is the cross-entropy of each anchor's cosine similarities to
all B positives, times ``similarity_scale`` (20), with its own positive as the right answer: sentence-transformers'
``MultipleNegativesRankingLoss``. The other B - 1 positives of the batch are the anchor's negatives.

NOTE: the negatives are those of one micro-batch. ``grad_accum_steps`` = k gives the mean gradient of k separate
B-pair problems, not of one kB-pair problem (that needs every embedding of the window at once, as GradCache
does), and with ``nproc`` > 1 each process likewise ranks against its own share of the batch only. More
negatives need a larger ``batch_size``; a batch of one pair has none and adds no gradient.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.data import split_rows
from kiln.errors import InvalidInput
from kiln.train.accumulate import Batch
from kiln.train.settings import PAIR_DATASETS
from kiln.train.text import TextBatcher, read_jsonl

logger = logging.getLogger(__name__)

MIN_PAIRS = 8  # at least 2 held out (retrieval among 1 candidate is always right) and a batch with negatives
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"(*])')
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ckpt", ".pt")


@dataclass(frozen=True)
class PairData:
    """``(anchor, positive)`` texts, split into train and held-out pairs."""

    name: str
    anchors_train: list[str]
    positives_train: list[str]
    anchors_test: list[str]
    positives_test: list[str]


def pydoc_pairs(limit: int | None = None) -> list[tuple[str, str]]:
    """Real pairs, no download: (first sentence, rest of its paragraph) from Python's help topics.

    The inverse cloze task: find the paragraph a sentence was cut from. Paragraphs of code (``>>>``) or grammar
    (``::=``) are skipped, and so are anchors under 6 words and rests under 8; a repeated anchor or positive is
    kept once (a duplicate in a batch would be a false negative). 584 pairs on Python 3.11.

    Example:
        >>> anchor, positive = pydoc_pairs(1)[0]
        >>> len(anchor.split()) >= 6 and len(positive.split()) >= 8
        True
    """
    from kiln.data import english_corpus

    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for paragraph in english_corpus():
        if ">>>" in paragraph or "::=" in paragraph:
            continue
        parts = _SENTENCE_END.split(paragraph, maxsplit=1)
        if len(parts) < 2 or len(parts[0].split()) < 6 or len(parts[1].split()) < 8:
            continue
        anchor, positive = parts
        if anchor in seen or positive in seen:
            continue
        seen.update((anchor, positive))
        pairs.append((anchor, positive))
        if limit is not None and len(pairs) == limit:
            break
    return pairs


def write_pydoc_pairs(
    path: Path, limit: int | None = None, *, anchor_column: str = "anchor", positive_column: str = "positive"
) -> Path:
    """Write :func:`pydoc_pairs` as JSONL rows ``{"anchor": ..., "positive": ...}`` (a dataset for ``kiln train``)."""
    with path.open("w", encoding="utf-8") as fh:
        for anchor, positive in pydoc_pairs(limit):
            fh.write(json.dumps({anchor_column: anchor, positive_column: positive}) + "\n")
    return path


def load_pairs(dataset: str, anchor_column: str, positive_column: str, test_fraction: float, seed: int) -> PairData:
    """``"pydoc_pairs"`` or a JSONL file of ``{"<anchor_column>": ..., "<positive_column>": ...}`` rows, split."""
    if dataset in PAIR_DATASETS:
        pairs, name = pydoc_pairs(), dataset
    else:
        path = Path(dataset)
        rows = read_jsonl(path, (anchor_column, positive_column), "set anchor_column / positive_column")
        pairs, name = [(str(r[anchor_column]), str(r[positive_column])) for r in rows], path.stem
    if len(pairs) < MIN_PAIRS:
        raise InvalidInput(
            f'"{dataset}" has {len(pairs)} pairs; embedding fine-tuning needs at least {MIN_PAIRS} (some held out '
            "to measure retrieval, the rest in batches of several pairs, since the other pairs are the negatives)",
            pairs=len(pairs),
        )
    for column, texts in ((anchor_column, [a for a, _ in pairs]), (positive_column, [p for _, p in pairs])):
        repeated = len(texts) - len(set(texts))
        if repeated:
            logger.warning(
                '"%s": %d %s texts repeat another row\'s; a repeat in the same batch is a false negative',
                dataset,
                repeated,
                column,
            )
    index_train, index_test = split_rows(len(pairs), test_fraction, seed, least=2)  # a pair's negatives: the others
    return PairData(
        name,
        [pairs[i][0] for i in index_train],
        [pairs[i][1] for i in index_train],
        [pairs[i][0] for i in index_test],
        [pairs[i][1] for i in index_test],
    )


def collate_pairs(anchor_ids: list[list[int]], positive_ids: list[list[int]]) -> Callable[[Sequence[int]], Batch]:
    """Pairs ``rows`` -> one padded batch of 2B texts (anchors, then positives) and ``y`` = each anchor's positive."""

    def collate(rows: Sequence[int]) -> Batch:
        texts = [anchor_ids[i] for i in rows] + [positive_ids[i] for i in rows]
        return TextBatcher.pad(texts) | {"y": torch.arange(len(rows))}

    return collate


def contrastive_loss(similarity_scale: float) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """In-batch negatives (MultipleNegativesRankingLoss), summed over the batch's anchors."""

    def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
        pairs = batch["y"].shape[0]
        embeddings = model(batch["input_ids"], batch["attention_mask"]).float()  # (2B, H), unit rows
        anchors, positives = embeddings[:pairs], embeddings[pairs:]
        scores = similarity_scale * anchors @ positives.T  # (B, B) scaled cosines; the diagonal holds the pairs
        return F.cross_entropy(scores, batch["y"], reduction="sum")

    return loss_sum


def embed(model: nn.Module, ids: list[list[int]], batch: int = 64) -> torch.Tensor:
    """Embeddings ``(N, H)`` of tokenised texts, in length-sorted batches (little padding), in eval mode."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            feeds = TextBatcher.pad([ids[i] for i in rows])
            vectors = model(feeds["input_ids"], feeds["attention_mask"]).float()  # (b, H)
            if out is None:
                out = torch.empty(len(ids), vectors.shape[1])
            out[torch.as_tensor(rows)] = vectors
    assert out is not None
    return out


def retrieval_metrics(model: nn.Module, anchor_ids: list[list[int]], positive_ids: list[list[int]]) -> dict[str, float]:
    """Each anchor ranks every held-out positive by cosine: ``recall_at_1`` (its own comes first) and ``mrr``."""
    anchors, positives = embed(model, anchor_ids), embed(model, positive_ids)
    scores = anchors @ positives.T  # (N, N)
    rank = (scores > scores.diagonal().unsqueeze(1)).sum(dim=1) + 1  # (N,) 1 = own positive ranked first
    return {"recall_at_1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}


def save_sentence_encoder(encoder: Any, base: Path, target: Path, max_length: int) -> Path:
    """Write ``encoder`` (LoRA merged) as a sentence-transformers directory at ``target``, replacing it.

    The weights and ``config.json`` come from ``encoder.save_pretrained``; the tokenizer files and the
    sentence-transformers module configs (pooling, normalisation) are copied from ``base``; ``max_seq_length``
    becomes ``max_length``, the length the encoder was tuned and evaluated at. ``kiln export`` reads the
    directory as it reads the bundled MiniLM, and ``SentenceTransformer(target)`` loads it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for item in base.iterdir():
            if item.is_dir() and re.fullmatch(r"\d+_\w+", item.name):  # sentence-transformers module configs
                shutil.copytree(item, staging / item.name)
            elif item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.suffix in (".json", ".txt"):
                shutil.copy2(item, staging / item.name)
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        # transformers' "Writing model shards" bar broke into kiln train's own output
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            encoder.save_pretrained(str(staging))  # config.json + model.safetensors
        finally:
            if shown:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        st_config = base / "sentence_bert_config.json"
        config = json.loads(st_config.read_text()) if st_config.is_file() else {}
        (staging / "sentence_bert_config.json").write_text(json.dumps(config | {"max_seq_length": max_length}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
