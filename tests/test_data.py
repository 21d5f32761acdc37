"""kiln.data: bundled English text and tabular data, held-out sets recorded with an artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln import data
from kiln.errors import InvalidInput

MakeManifest = Callable[..., artifacts.Manifest]


def test_english_corpus_is_real_english_paragraphs() -> None:
    texts = data.english_corpus(300)
    assert len(texts) == 300
    assert all(isinstance(t, str) and len(t) >= 20 for t in texts)
    assert all(t == " ".join(t.split()) for t in texts)  # whitespace normalised, one line each
    assert len({len(t) for t in texts}) > 100  # natural lengths, not a template repeated
    words = " ".join(texts).lower().split()
    for common in ("the", "is", "of", "and", "a"):
        assert common in words


def test_english_corpus_has_enough_text_for_calibration_and_evaluation() -> None:
    assert len(data.english_corpus()) > data.TEXT_EVAL_OFFSET + 512


def test_english_corpus_offsets_give_disjoint_slices() -> None:
    first = data.english_corpus(200)
    second = data.english_corpus(200, offset=200)
    assert len(second) == 200
    assert first == data.english_corpus(400)[:200]
    assert second == data.english_corpus(400)[200:]
    assert not set(first) & set(second)


def test_bundled_digits_shapes_and_dtypes() -> None:
    digits = data.bundled_dataset("digits")
    assert digits.task == "classification"
    assert digits.x_train.shape == (1347, 64) and digits.x_test.shape == (450, 64)
    assert digits.y_train.shape == (1347,) and digits.y_test.shape == (450,)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.target_names == tuple(str(i) for i in range(10))


def test_bundled_digits_split_is_stratified_and_reproducible() -> None:
    digits = data.bundled_dataset("digits", test_fraction=0.2, seed=3)
    train_share = np.bincount(digits.y_train, minlength=10) / len(digits.y_train)
    test_share = np.bincount(digits.y_test, minlength=10) / len(digits.y_test)
    np.testing.assert_allclose(test_share, train_share, atol=0.01)
    again = data.bundled_dataset("digits", test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    other_seed = data.bundled_dataset("digits", test_fraction=0.2, seed=4)
    assert not np.array_equal(other_seed.x_test, digits.x_test)


def test_bundled_regression_dataset() -> None:
    diabetes = data.bundled_dataset("diabetes")
    assert diabetes.task == "regression"
    assert diabetes.y_train.dtype == np.float32
    assert diabetes.target_names == ()


def test_unknown_dataset_suggests_close_name() -> None:
    with pytest.raises(InvalidInput, match=r'dataset "digit" is not bundled \(did you mean "digits"\?\); choose one'):
        data.bundled_dataset("digit")


def test_heldout_asset_and_eval_set_round_trip(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest
) -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=10).astype(np.int64)
    art = artifacts.write(
        repository,
        make_manifest(eval_data={"kind": "tabular", "file": "heldout.npz"}),
        tiny_onnx_model,
        assets={"heldout.npz": data.heldout_asset({"input": features}, labels)},
    )

    loaded = data.eval_set(artifacts.load(art.path))

    assert loaded.texts is None and loaded.rows == 10
    assert loaded.feeds is not None and loaded.labels is not None
    assert list(loaded.feeds) == ["input"]
    np.testing.assert_array_equal(loaded.feeds["input"], features)
    np.testing.assert_array_equal(loaded.labels, labels)

    head = data.eval_set(art, limit=4)
    assert head.rows == 4
    np.testing.assert_array_equal(head.labels, labels[:4])


def test_heldout_asset_without_labels(repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest) -> None:
    features = np.ones((3, 4), dtype=np.float32)
    art = artifacts.write(
        repository,
        make_manifest(eval_data={"kind": "tabular"}),  # file defaults to heldout.npz
        tiny_onnx_model,
        assets={data.HELDOUT_FILE: data.heldout_asset({"input": features}, None)},
    )
    loaded = data.eval_set(art)
    assert loaded.labels is None and loaded.rows == 3


def test_eval_set_text_corpus_starts_after_calibration_texts(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest
) -> None:
    art = artifacts.write(repository, make_manifest(eval_data={"kind": "text_corpus"}), tiny_onnx_model)

    texts = data.eval_set(art, limit=16).texts

    assert texts == data.english_corpus(16, offset=data.TEXT_EVAL_OFFSET)
    assert not set(texts) & set(data.english_corpus(data.TEXT_EVAL_OFFSET))
    assert data.eval_set(art).rows == 512


def test_eval_set_text_corpus_honours_recorded_offset(
    repository: Path, tiny_onnx_model: Path, make_manifest: MakeManifest
) -> None:
    art = artifacts.write(repository, make_manifest(eval_data={"kind": "text_corpus", "offset": 1500}), tiny_onnx_model)
    assert data.eval_set(art, limit=5).texts == data.english_corpus(5, offset=1500)


def test_eval_set_without_eval_data_is_invalid_input(tiny_artifact: artifacts.Artifact) -> None:
    with pytest.raises(InvalidInput, match=r'model "tiny" v1 has no held-out data \(eval_data: none\)'):
        data.eval_set(tiny_artifact)


def test_eval_set_take_selects_rows() -> None:
    texts = data.EvalSet(texts=["a", "b", "c"], labels=np.array([0, 1, 2]))
    picked = texts.take(np.array([2, 0]))
    assert picked.texts == ["c", "a"]
    np.testing.assert_array_equal(picked.labels, [2, 0])


# --- found in review: each failed before its fix ----------------------------------------------------------------------


def test_read_npz_refuses_files_that_are_not_an_npz_with_invalid_input(tmp_path: Path) -> None:
    # an .npy was a TypeError ("does not support the context manager protocol"), an empty file an EOFError and a
    # truncated .npz a zipfile.BadZipFile: stack traces for a wrong --eval-data or --calibration-data file
    np.save(tmp_path / "rows.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(InvalidInput, match=r'"[^"]*rows\.npy" is an \.npy file \(one unnamed array\), not an \.npz'):
        data.read_npz(tmp_path / "rows.npy", "held-out data file")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(InvalidInput, match=r'"[^"]*empty\.npz" is not a readable \.npz'):
        data.read_npz(tmp_path / "empty.npz", "held-out data file")
    np.savez(tmp_path / "good.npz", input=np.zeros((64, 8), dtype=np.float32))
    whole = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidInput, match=r'"[^"]*cut\.npz" is not a readable \.npz'):
        data.read_npz(tmp_path / "cut.npz", "held-out data file")
    with pytest.raises(InvalidInput, match=r'"[^"]*" is a directory; pass an \.npz'):
        data.read_npz(tmp_path, "held-out data file")


def test_held_out_data_with_a_scalar_array_is_invalid_input(tmp_path: Path) -> None:
    # was TypeError "len() of unsized object"
    np.savez(tmp_path / "scalar.npz", input=np.float32(1.0))
    with pytest.raises(InvalidInput, match=r'holds a scalar "input"; each array holds rows'):
        data.load_eval_npz(tmp_path / "scalar.npz", ["input"])
    np.savez(tmp_path / "labels.npz", input=np.zeros((3, 2), dtype=np.float32), labels=np.int64(1))
    with pytest.raises(InvalidInput, match=r'holds a scalar "labels"'):
        data.load_eval_npz(tmp_path / "labels.npz", ["input"])


def test_held_out_data_with_nan_rows_is_invalid_input(tmp_path: Path) -> None:
    # the accuracy guard scored NaN and told the user to loosen --max-accuracy-drop
    np.savez(tmp_path / "nan.npz", input=np.full((3, 2), np.nan, np.float32))
    with pytest.raises(InvalidInput, match=r'array "input" holds NaN or infinite values; hold out real, finite rows'):
        data.load_eval_npz(tmp_path / "nan.npz", ["input"])


def test_topic_paragraphs_are_real_text_labelled_by_their_group() -> None:
    from kiln.data import topic_paragraphs

    rows = topic_paragraphs({"errors": ("try", "raise"), "strings": ("strings",)})
    assert {label for _, label in rows} == {"errors", "strings"}
    assert all(len(text) >= 40 and "\n" not in text for text, _ in rows)
    assert any("finally" in text for text, label in rows if label == "errors")
    with pytest.raises(InvalidInput, match=r'"tyr" is not a help topic \(did you mean "try"\?\); name keys of'):
        topic_paragraphs({"errors": ("tyr",)})
