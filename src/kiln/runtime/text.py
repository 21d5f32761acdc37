"""Text in, embeddings out: the artifact's fast tokenizer plus length-sorted batching.

Sorting texts by token length before batching is what makes batch 32 pay on a CPU: a batch of arrival-order
texts pads every row to its longest member, and attention cost grows with the padded length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import InvalidInput
from kiln.runtime.engine import Engine
from kiln.runtime.wordpiece import AsciiWordPiece
from kiln.types import Feeds

# English averages 4-5 characters a token (spaces included) with BERT's WordPiece; 32 leaves a wide margin.
CHARS_PER_TOKEN = 32


class TextTokenizer:
    """A Hugging Face *fast* tokenizer (``tokenizer.json``) without transformers on the hot path; for BERT
    WordPiece, ASCII text skips the tokenizers library too (:mod:`kiln.runtime.wordpiece`), with the same ids."""

    def __init__(self, tokenizer_json: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        if not tokenizer_json.is_file():
            raise InvalidInput(f'tokenizer file "{tokenizer_json}" does not exist', path=str(tokenizer_json))
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self.max_length = max_length
        self.vocab_size = int(self._tokenizer.get_vocab_size())  # checked against every token-id request
        self._wordpiece = AsciiWordPiece.from_tokenizer_json(tokenizer_json, max_length)

    @property
    def has_fast_path(self) -> bool:
        """Whether ASCII text skips the library (a BERT WordPiece tokenizer: :mod:`kiln.runtime.wordpiece`)."""
        return self._wordpiece is not None

    @property
    def max_chars(self) -> int:
        """Characters of a text read at most: ``CHARS_PER_TOKEN`` per token of ``max_length``."""
        return self.max_length * CHARS_PER_TOKEN

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length``, unpadded.

        A text is cut to ``max_chars`` first: the tokenizer reads the whole text before it truncates (a 15 MB
        string took 13 s), and a text's first ``max_length`` tokens lie within its first ``max_chars`` unless
        its tokens average more than ``CHARS_PER_TOKEN`` characters (long runs of spaces, words of over 100
        characters that become one unknown token each).
        """
        limit = self.max_chars
        cut = [text[:limit] for text in texts]
        if self._wordpiece is None:
            return self._library(cut)
        fast = [self._wordpiece.encode(text) for text in cut]
        # the library tokenizes the rest (not ASCII, or holding an added token), in one call
        rest = iter(self._library([text for text, row in zip(cut, fast, strict=True) if row is None]))
        return [row if row is not None else next(rest) for row in fast]

    def _library(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # NOTE: encode_batch_fast skips the character offsets, which nothing here reads (53 µs, not 92, a paragraph)
        return [enc.ids for enc in self._tokenizer.encode_batch_fast(texts)]

    @staticmethod
    def pad(ids: Sequence[Sequence[int]], input_names: Sequence[str]) -> Feeds:
        """Right-pad a batch to its longest row: ``input_ids``, ``attention_mask``, ``token_type_ids``."""
        rows, width = len(ids), max(len(row) for row in ids)
        input_ids = np.zeros((rows, width), dtype=np.int64)  # (B, T)
        attention_mask = np.zeros((rows, width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        feeds: Feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return {k: v for k, v in feeds.items() if k in input_names}


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray[Any, Any]]:
    """Index batches of at most ``batch_size`` rows, longest first, so each batch pads little."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class TextEncoder:
    """Encodes texts with an engine whose inputs are token ids and whose first output is the embedding.

    Example:
        >>> encoder = TextEncoder.from_artifact(load("kiln-repo/minilm"))  # doctest: +SKIP
        >>> encoder.encode(["a sentence", "another one"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, output: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._input_names = [spec.name for spec in engine.inputs]
        self._output = output or engine.outputs[0].name

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, sort_by_length: bool = True
    ) -> np.ndarray[Any, Any]:
        if not texts:
            raise InvalidInput("no texts to encode; pass at least one string")
        ids = self.tokenizer.encode(texts)
        if sort_by_length:
            batches = sorted_batches([len(row) for row in ids], batch_size)
        else:
            batches = [np.arange(i, min(i + batch_size, len(ids))) for i in range(0, len(ids), batch_size)]
        result: np.ndarray[Any, Any] | None = None
        for index in batches:
            feeds = TextTokenizer.pad([ids[i] for i in index], self._input_names)
            out = self.engine.run(feeds)[self._output]
            if result is None:
                result = np.empty((len(ids), *out.shape[1:]), dtype=out.dtype)
            result[index] = out
        assert result is not None
        return result


def tokenizer_for(artifact: Any) -> TextTokenizer | None:
    """The tokenizer an artifact's manifest describes (in ``assets/``); ``None`` for a model that takes no text."""
    pre = artifact.manifest.preprocessing
    if pre.get("kind") != "text":
        return None
    return TextTokenizer(artifact.assets_dir / pre["tokenizer"], int(pre["max_length"]))


def text_encoder_for(artifact: Any, engine: Engine) -> TextEncoder:
    """Build the TextEncoder an artifact's manifest describes (tokenizer in ``assets/``)."""
    tokenizer = tokenizer_for(artifact)
    if tokenizer is None:
        pre = artifact.manifest.preprocessing
        raise InvalidInput(f'model "{artifact.name}" does not take text (preprocessing: {pre or "none"})')
    return TextEncoder(engine, tokenizer)
