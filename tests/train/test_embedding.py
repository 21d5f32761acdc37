"""Embedding fine-tuning on real text pairs: in-batch negatives, held-out retrieval, a MiniLM-style artifact."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.data import english_corpus
from kiln.errors import ConfigError, InvalidInput
from kiln.runtime import OrtEngine, text_encoder_for
from kiln.train import Checkpointer, TrainSettings, load_train_settings, train
from kiln.train.embedding import (
    MIN_PAIRS,
    collate_pairs,
    contrastive_loss,
    embed,
    load_pairs,
    pydoc_pairs,
    retrieval_metrics,
)
from kiln.train.text import SentenceEncoder, TextBatcher, encoder_path, load_encoder, merge_lora

EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "kiln" / "train" / "examples" / "pydoc_pairs.toml"


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_pydoc_pairs_cut_real_paragraphs_in_two() -> None:
    pairs = pydoc_pairs()
    paragraphs = set(english_corpus())
    assert len(pairs) >= 500
    assert all(f"{anchor} {positive}" in paragraphs for anchor, positive in pairs)  # sentence + rest = paragraph
    texts = [t for pair in pairs for t in pair]
    assert len(set(texts)) == len(texts)  # a repeat would be a false negative in its batch


def test_pairs_split_and_named_columns(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(12)]
    data = load_pairs(str(_write(tmp_path / "qa.jsonl", rows)), "question", "answer", 0.25, 0)
    assert (len(data.anchors_train), len(data.anchors_test)) == (9, 3)
    # pairs stay pairs through the split
    assert [a[1:] for a in data.anchors_test] == [p[1:] for p in data.positives_test]
    assert [a[1:] for a in data.anchors_train] == [p[1:] for p in data.positives_train]


def test_a_missing_key_names_the_line_the_closest_key_and_the_setting(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    rows = [{"anchor": "a", "positive": "b"}, {"anchor": "c", "postive": "d"}]
    settings = make_settings(dataset=str(_write(tmp_path / "p.jsonl", rows)), task="embedding", model="minilm")
    with pytest.raises(
        InvalidInput,
        match=r'line 2 has no key "positive" \(did you mean "postive"\?\); its keys are anchor, postive '
        r"\(set anchor_column / positive_column\)",
    ):
        train(settings)


def test_a_line_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"anchor": "a", "positive": "b"}, ["c", "d"]])
    with pytest.raises(InvalidInput, match=r'line 2 is a JSON list, not an object like \{"anchor": ..., "positive"'):
        load_pairs(str(path), "anchor", "positive", 0.25, 0)


def test_too_few_pairs_are_refused(make_settings: Callable[..., TrainSettings], tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"anchor": f"a{i}", "positive": f"p{i}"} for i in range(MIN_PAIRS - 3)])
    with pytest.raises(InvalidInput, match=r"has 5 pairs; embedding fine-tuning needs at least 8"):
        train(make_settings(dataset=str(path), task="embedding", model="minilm"))


def test_a_held_out_split_of_one_pair_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"anchor": f"a{i}", "positive": f"p{i}"} for i in range(MIN_PAIRS)])
    with pytest.raises(ConfigError, match=r"of 8 rows holds out 1 and trains on 7; the split needs at least 2 rows on"):
        load_pairs(str(path), "anchor", "positive", 0.1, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": "iris", "task": "embedding", "model": "mlp"}, r'dataset "iris" is not a \.jsonl file'),
        ({"batch_size": 1}, r"batch_size is 1; .* so it needs >= 2"),
        ({"max_tokens": 1024, "adaptive_batch": True}, r"does not support adaptive_batch, max_tokens; remove them"),
        ({"task": "classification"}, r'dataset "pydoc_pairs" holds text pairs for task = "embedding"'),
        ({"similarity_scale": 0.0}, r"similarity_scale is 0; it must be > 0"),
    ],
)
def test_settings_that_cannot_train_embeddings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**({"dataset": "pydoc_pairs", "model": "minilm"} | overrides))  # type: ignore[arg-type]


def test_the_shipped_example_fine_tunes_minilm_on_pydoc_pairs() -> None:
    settings, _ = load_train_settings(EXAMPLE, environ={})
    assert settings.is_embedding and (settings.dataset, settings.model) == ("pydoc_pairs", "minilm")


@pytest.mark.slow
def test_the_shipped_example_improves_held_out_retrieval(tmp_path: Path) -> None:
    # the README's claim: one epoch on ~440 pairs lifts held-out recall@1 and MRR (146 held-out pairs; measured
    # 0.452 -> 0.548 and 0.591 -> 0.672); the margins leave room for other CPUs' arithmetic, not for a wrong loss
    settings, _ = load_train_settings(EXAMPLE, environ={})
    tuned = dataclasses.replace(
        settings, track=False, export=False, checkpoint_dir=str(tmp_path / "ckpt"), out=str(tmp_path / "r")
    )
    metrics = train(tuned).metrics
    assert metrics["test_recall_at_1"] >= metrics["base_recall_at_1"] + 0.04, metrics
    assert metrics["test_mrr"] >= metrics["base_mrr"] + 0.03, metrics


def test_the_loss_is_sentence_transformers_multiple_negatives_ranking_loss(pairs_jsonl: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    data = load_pairs(str(pairs_jsonl), "anchor", "positive", 0.25, 0)
    anchors, positives = data.anchors_train[:6], data.positives_train[:6]
    path = encoder_path("minilm")
    batcher = TextBatcher(path, 32)
    batch = collate_pairs(batcher.encode(anchors), batcher.encode(positives))(range(6))
    ours = SentenceEncoder(load_encoder(path, 0)).eval()
    reference = SentenceTransformer(str(path), device="cpu").eval()
    reference.max_seq_length = 32
    features = [reference.preprocess(anchors), reference.preprocess(positives)]
    with torch.inference_mode():
        expected = float(MultipleNegativesRankingLoss(reference)(features, torch.empty(0)))  # mean over anchors
        got = float(contrastive_loss(20.0)(ours, batch)) / 6
        mismatched = float(contrastive_loss(20.0)(ours, batch | {"y": torch.arange(6).flip(0)})) / 6
    assert expected > 0.01  # a loss of ~0 would compare nothing
    assert got == pytest.approx(expected, rel=1e-4)
    assert mismatched > got + 2.0  # the diagonal really is the answer: every anchor given another's positive


@pytest.mark.slow
def test_lora_embedding_fine_tune_learns_and_exports_a_minilm_style_artifact(
    make_settings: Callable[..., TrainSettings], pairs_jsonl: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        dataset=str(pairs_jsonl),
        task="embedding",
        model="minilm",
        max_length=32,
        batch_size=8,
        epochs=2,
        lr=2e-3,
        lora_rank=8,
        export=True,
        checkpoint_every=0,
    )
    result = train(settings)
    metrics = result.metrics
    # 30 training pairs in 4 batches of 8, 2 epochs; 10 held out: too few to show a held-out gain (a flipped loss
    # passed such a check), so this run proves learning by the in-batch loss below, and the shipped example's test
    # proves the held-out gain
    assert result.steps == 8
    assert set(metrics) >= {"test_recall_at_1", "test_mrr", "base_recall_at_1", "base_mrr"}

    # the trained weights (from the checkpoint written at exit), with LoRA merged the way export merges it
    path = encoder_path("minilm")
    tuned = SentenceEncoder(load_encoder(path, 8))
    tuned.load_state_dict(Checkpointer(tmp_path / "ckpt").load()["model"])
    tuned = merge_lora(tuned).eval()
    base = SentenceEncoder(load_encoder(path, 0)).eval()
    data = load_pairs(str(pairs_jsonl), "anchor", "positive", settings.test_fraction, settings.seed)
    batcher = TextBatcher(path, 32)
    anchors, positives = batcher.encode(data.anchors_train), batcher.encode(data.positives_train)

    def in_batch_loss(model: SentenceEncoder) -> float:
        """MultipleNegativesRankingLoss over the training pairs in fixed batches of 8, written out here."""
        a, p = embed(model, anchors), embed(model, positives)  # (30, 384) unit rows
        losses = [
            torch.nn.functional.cross_entropy(20.0 * a[i : i + 8] @ p[i : i + 8].T, torch.arange(len(a[i : i + 8])))
            for i in range(0, len(a), 8)
        ]
        return float(sum(losses)) / len(losses)

    before, after = in_batch_loss(base), in_batch_loss(tuned)
    assert after < 0.7 * before, (before, after)  # the in-batch loss on the training pairs fell
    ids_test = batcher.encode(data.anchors_test), batcher.encode(data.positives_test)
    assert retrieval_metrics(tuned, *ids_test) == {
        k.removeprefix("test_"): v for k, v in metrics.items() if "test_" in k
    }

    art = result.artifact
    assert art is not None
    manifest = art.manifest
    assert manifest.task == "embedding"
    assert [o.name for o in manifest.signature.outputs] == ["sentence_embedding"]
    assert manifest.preprocessing == {
        "kind": "text",
        "tokenizer": "tokenizer/tokenizer.json",
        "max_length": 32,
        "pooling": "mean",
        "normalize": True,
    }
    source = manifest.provenance["source"]
    assert (source["framework"], source["num_attention_heads"], source["hidden_size"]) == ("transformers", 12, 384)
    assert manifest.provenance["train"]["lora_merged"] is True
    import onnx

    names = [i.name for i in onnx.load(str(art.model_path)).graph.initializer]
    assert not [n for n in names if "lora" in n.lower()]  # merged: no adapter weights in the graph

    # ONNX Runtime through the artifact's own tokenizer gives the trained model's vectors, not the base model's
    texts = data.anchors_test + data.positives_test
    got = text_encoder_for(art, OrtEngine(art.model_path)).encode(texts, batch_size=8)
    expected = embed(tuned, batcher.encode(texts)).numpy()
    untuned = embed(base, batcher.encode(texts)).numpy()
    assert float((got * expected).sum(axis=1).min()) >= 0.999
    assert float((got * untuned).sum(axis=1).min()) < 0.99
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    # the saved directory is a sentence-transformers model with the same vectors
    from sentence_transformers import SentenceTransformer

    saved = SentenceTransformer(manifest.provenance["train"]["encoder_dir"], device="cpu")
    assert saved.max_seq_length == 32
    np.testing.assert_allclose(saved.encode(texts, batch_size=8), got, atol=1e-4)


def test_saving_the_fine_tuned_encoder_draws_no_progress_bar_of_its_own(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # transformers' "Writing model shards" bar broke into kiln train's progress bar and final table
    from transformers.utils import logging as hf_logging

    from kiln.train.embedding import save_sentence_encoder
    from kiln.train.text import encoder_path, load_encoder

    base = encoder_path("minilm")
    saved = save_sentence_encoder(load_encoder(base, 0), base, tmp_path / "tuned", max_length=64)
    assert (saved / "model.safetensors").is_file()
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back as it was
