"""A fast path for BERT's WordPiece on ASCII text, giving exactly the ids of the ``tokenizers`` library.

Why: a server tokenizes one request at a time, between inference runs that evict the CPU caches, so its
tokenizer runs cold. The library's pipeline (normalizer, pre-tokenizer, model, post-processor, with alignments
per character) then costs several times its warm time; this path does a fraction of that work.
``bench/serve_tokenize.py`` measures both, warm and cold, and the README quotes it.

It serves only what it can serve exactly, and the caller falls back to the library for the rest:
- the tokenizer must be BERT's: ``BertNormalizer`` (``clean_text`` on), ``BertPreTokenizer``, a ``WordPiece``
  model, and a post-processor that puts one special token before and one after a single sequence
  (:meth:`AsciiWordPiece.from_tokenizer_json` returns ``None`` for anything else);
- the text must be ASCII, where Unicode normalization, accent stripping and Chinese characters change nothing,
  and must not contain an added token (``[MASK]``, ``[SEP]``, ...), which the library matches before normalizing.

On ASCII, BERT's pipeline reduces to: drop control characters but map tab, newline and carriage return to spaces;
lowercase (if the normalizer does); split into runs of letters and digits and single punctuation characters
(every other printable ASCII character is punctuation to BERT, ``_`` included); then greedy longest-match-first
WordPiece per word, ``[UNK]`` for a word that does not split or is longer than ``max_input_chars_per_word``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# Control characters BertNormalizer drops (Unicode category Cc), except tab, newline and carriage return, which
# it maps to a space like every other whitespace character.
_CLEAN = str.maketrans({**dict.fromkeys(range(32)), 127: None, 9: " ", 10: " ", 13: " "})
_NEEDS_CLEANING = re.compile(r"[\x00-\x1f\x7f]")
_WORDS = {True: re.compile(r"[a-z0-9]+|[^a-z0-9 ]"), False: re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9 ]")}


class AsciiWordPiece:
    """BERT WordPiece ids for ASCII text, special tokens added and truncated to ``max_length``.

    Example:
        >>> fast = AsciiWordPiece.from_tokenizer_json(Path("assets/tokenizer/tokenizer.json"), 256)  # doctest: +SKIP
        >>> fast.encode("Hello, world")  # doctest: +SKIP
        [101, 7592, 1010, 2088, 102]
    """

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        prefix: str,
        unk_id: int,
        max_word_chars: int,
        first_id: int,
        last_id: int,
        lowercase: bool,
        added: list[str],
        max_length: int,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length is {max_length}; it must leave room for the two special tokens (>= 2)")
        self._vocab = vocab
        self._continuations = {token[len(prefix) :]: i for token, i in vocab.items() if token.startswith(prefix)}
        self._unk = unk_id
        self._max_word_chars = max_word_chars
        self._first, self._last = first_id, last_id
        self._lowercase = lowercase
        self._words = _WORDS[lowercase]
        # the library finds added tokens in the raw text (or, for normalized ones, the lowercased text)
        contents = sorted({token for content in added for token in (content, content.lower())})
        self._added = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._max_length = max_length

    @classmethod
    def from_tokenizer_json(cls, path: Path, max_length: int) -> AsciiWordPiece | None:
        """The fast path for the tokenizer in ``path``, or ``None`` when it is not a BERT WordPiece tokenizer."""
        spec = json.loads(path.read_text(encoding="utf-8"))
        normalizer, model = spec.get("normalizer") or {}, spec.get("model") or {}
        if (
            normalizer.get("type") != "BertNormalizer"
            or not normalizer.get("clean_text")
            or (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or max_length < 2
        ):
            return None
        vocab: dict[str, int] = model["vocab"]
        specials = _surrounding_specials(spec.get("post_processor"))
        if specials is None or model.get("unk_token") not in vocab:
            return None
        return cls(
            vocab,
            prefix=model.get("continuing_subword_prefix") or "##",
            unk_id=vocab[model["unk_token"]],
            max_word_chars=int(model.get("max_input_chars_per_word", 100)),
            first_id=specials[0],
            last_id=specials[1],
            lowercase=bool(normalizer.get("lowercase", True)),
            added=[token["content"] for token in spec.get("added_tokens") or []],
            max_length=max_length,
        )

    def encode(self, text: str) -> list[int] | None:
        """The ids of ``text``, or ``None`` where only the library can tokenize it exactly (see the module)."""
        if not text.isascii():
            return None
        normalized = text.lower() if self._lowercase else text
        if _NEEDS_CLEANING.search(normalized):
            normalized = normalized.translate(_CLEAN)
        if self._added is not None and (self._added.search(text) or self._added.search(normalized)):
            return None
        ids = [self._first]
        room = self._max_length - 1  # ids before the closing special token
        vocab, unk, max_chars = self._vocab, self._unk, self._max_word_chars
        for word in self._words.findall(normalized):
            if len(word) > max_chars:
                ids.append(unk)
            else:
                found = vocab.get(word)
                if found is not None:
                    ids.append(found)
                else:
                    ids.extend(self._pieces(word))
            if len(ids) >= room:
                break
        del ids[room:]
        ids.append(self._last)
        return ids

    def _pieces(self, word: str) -> list[int]:
        """Greedy longest-match-first WordPiece of a word not in the vocabulary whole; ``[unk]`` if it does not
        split into known pieces."""
        pieces: list[int] = []
        start, end_of_word, table = 0, len(word), self._vocab
        while start < end_of_word:
            for end in range(end_of_word, start, -1):
                found = table.get(word[start:end])
                if found is not None:
                    pieces.append(found)
                    start, table = end, self._continuations
                    break
            else:
                return [self._unk]
        return pieces


def _surrounding_specials(post: Any) -> tuple[int, int] | None:
    """The ids of the special tokens a post-processor puts around a single sequence, if it is exactly one before
    and one after (BERT's ``[CLS] A [SEP]``), else ``None``."""
    if not isinstance(post, dict):
        return None
    if post.get("type") == "BertProcessing":
        return int(post["cls"][1]), int(post["sep"][1])
    if post.get("type") != "TemplateProcessing":
        return None
    single = post.get("single") or []
    if len(single) != 3 or "Sequence" not in single[1] or not all("SpecialToken" in single[i] for i in (0, 2)):
        return None
    ids = []
    for piece in (single[0], single[2]):
        token = (post.get("special_tokens") or {}).get(piece["SpecialToken"]["id"]) or {}
        if len(token.get("ids") or []) != 1:
            return None
        ids.append(int(token["ids"][0]))
    return ids[0], ids[1]
