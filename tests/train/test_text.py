"""Text classification on real paragraphs: MiniLM + LoRA, token-budget batches, export with the tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError, InvalidInput
from kiln.runtime import OrtEngine
from kiln.train import Checkpointer, TrainSettings, train
from kiln.train.text import TextBatcher, encoder_path, load_jsonl


def test_jsonl_missing_key_suggests_the_closest(topics_jsonl: Path) -> None:
    with pytest.raises(InvalidInput, match=r'line 1 has no key "txt" \(did you mean "text"\?\)'):
        load_jsonl(topics_jsonl, "txt", "label", 0.25, 0)


def test_jsonl_bad_lines_are_named_with_the_fix(topics_jsonl: Path) -> None:
    good = topics_jsonl.read_text(encoding="utf-8").splitlines()[:10]
    cases = {
        "not JSON": (
            "not json",
            r"line 11 is not valid JSON \(Expecting value at column 1: 'not json'\); each line must be one JSON "
            r'object like \{"text": \.\.\., "label": \.\.\.\}: fix the line or remove it',
        ),
        # str() made these the text "None" and the class "['a']", silently
        "null text": ('{"text": null, "label": "errors"}', r'line 11 has null under "text"; it must be a string'),
        "array label": ('{"text": "x", "label": ["a"]}', r'line 11 has a JSON array under "label"; it must be'),
    }
    for name, (line, message) in cases.items():
        path = topics_jsonl.with_name(f"{name}.jsonl")
        path.write_text("\n".join([*good, line]) + "\n", encoding="utf-8")
        with pytest.raises(InvalidInput, match=message):
            load_jsonl(path, "text", "label", 0.25, 0)


def test_jsonl_encoding_byte_order_mark_and_one_class(topics_jsonl: Path) -> None:
    raw = topics_jsonl.read_bytes()
    marked = topics_jsonl.with_name("marked.jsonl")
    marked.write_bytes(b"\xef\xbb\xbf" + raw)
    assert load_jsonl(marked, "text", "label", 0.25, 0).labels == ("errors", "strings")
    latin = topics_jsonl.with_name("latin.jsonl")
    latin.write_bytes(raw.replace(b"the", b"th\xe9", 1))
    with pytest.raises(InvalidInput, match=r"line 1 holds byte 0xe9, which is not UTF-8"):
        load_jsonl(latin, "text", "label", 0.25, 0)
    one = topics_jsonl.with_name("one.jsonl")
    one.write_text("".join(f'{{"text": "row {i}", "label": "spam"}}\n' for i in range(8)), encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"has the label 'spam' under \"label\"; a classifier needs at least 2"):
        load_jsonl(one, "text", "label", 0.25, 0)


def test_a_tabular_model_on_text_is_refused(make_settings: Callable[..., TrainSettings], topics_jsonl: Path) -> None:
    with pytest.raises(ConfigError, match=r'a \.jsonl text dataset needs a text encoder: model = "minilm"'):
        train(make_settings(dataset=str(topics_jsonl), model="mlp"))


def test_a_max_length_beyond_the_encoders_positions_is_refused_before_training(
    make_settings: Callable[..., TrainSettings], topics_jsonl: Path
) -> None:
    # MiniLM has 512 positions: a row longer than that crashed the run in torch when a batch first held one
    with pytest.raises(ConfigError, match=r"max_length is 4096, but the encoder at .* has 512 positions .* <= 512"):
        train(make_settings(dataset=str(topics_jsonl), model="minilm", max_length=4096))


def test_a_token_budget_below_max_length_is_refused_before_training() -> None:
    # a row cut at max_length fit no batch: "row 1 has 32 tokens, more than max_tokens=16", numbered in the split
    with pytest.raises(ConfigError, match=r"max_tokens is 16, below max_length 32: .* set max_tokens >= 32"):
        TrainSettings(dataset="topics.jsonl", model="minilm", max_length=32, max_tokens=16)


def test_lora_trains_only_the_adapters_and_the_head(
    make_settings: Callable[..., TrainSettings], topics_jsonl: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        dataset=str(topics_jsonl), model="minilm", max_length=32, max_tokens=512, lora_rank=4, max_steps=3, lr=1e-2
    )
    train(settings)
    state = Checkpointer(tmp_path / "ckpt").load()
    from safetensors.torch import load_file

    base = load_file(str(encoder_path("minilm") / "model.safetensors"))
    # PEFT wraps the frozen projection as `...query.base_layer.weight`
    trained_base = state["model"]["encoder.base_model.model.encoder.layer.0.attention.self.query.base_layer.weight"]
    assert torch.equal(trained_base, base["encoder.layer.0.attention.self.query.weight"])  # frozen
    lora_b = [v for k, v in state["model"].items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: it moved
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["position"] == 3  # 3 token-budget batches used


@pytest.mark.slow
def test_text_classifier_exports_with_its_tokenizer_and_merged_lora(
    make_settings: Callable[..., TrainSettings], topics_jsonl: Path
) -> None:
    settings = make_settings(
        dataset=str(topics_jsonl),
        model="minilm",
        max_length=64,
        max_tokens=1024,
        lora_rank=8,
        epochs=2,
        lr=2e-3,
        export=True,
        checkpoint_every=0,
    )
    result = train(settings)
    assert result.metrics["test_accuracy"] >= 0.9
    art = result.artifact
    assert art is not None
    manifest = art.manifest
    assert manifest.preprocessing == {"kind": "text", "tokenizer": "tokenizer/tokenizer.json", "max_length": 64}
    assert manifest.provenance["train"]["lora_merged"] is True
    assert (art.assets_dir / "tokenizer" / "tokenizer.json").is_file()
    import onnx

    names = [i.name for i in onnx.load(str(art.model_path)).graph.initializer]
    assert not [n for n in names if "lora" in n.lower()]  # merged: no adapter weights left in the graph
    # held-out texts, tokenised with the artifact's own tokenizer, padded per batch (sequence axis really dynamic)
    data = load_jsonl(topics_jsonl, "text", "label", settings.test_fraction, settings.seed)
    batcher = TextBatcher(art.assets_dir / "tokenizer", 64)
    ids = batcher.encode(data.texts_test)
    engine = OrtEngine(art.model_path)
    predicted = []
    for start in range(0, len(ids), 16):
        feeds = {k: v.numpy() for k, v in TextBatcher.pad(ids[start : start + 16]).items()}
        predicted.append(engine.run(feeds)["logits"].argmax(axis=1))
    accuracy = float((np.concatenate(predicted) == data.y_test).mean())
    assert accuracy == pytest.approx(result.metrics["test_accuracy"], abs=1.5 / len(ids))

    # `kiln optimize` takes it as it is: held-out texts and labels to guard accuracy on, transformer fusions
    from kiln.config import OptimizeSettings
    from kiln.data import eval_set
    from kiln.optimize import optimize

    held_out = eval_set(art)
    assert held_out.texts == data.texts_test and held_out.labels is not None
    np.testing.assert_array_equal(held_out.labels, data.y_test)
    search = optimize(
        art, settings=OptimizeSettings(recipes=("fused",), batch_sizes=(32,), target_batch_size=32, measure_repeats=2)
    )
    (fused,) = search.candidates
    assert any("Attention x6" in fired for fired in search.fusions())  # the fuser found MiniLM's 6 attention blocks
    assert search.parent_figures["accuracy"] == pytest.approx(accuracy, abs=1.5 / len(ids))
    assert fused.figures["accuracy"] == pytest.approx(search.parent_figures["accuracy"], abs=1.5 / len(ids))
    # and `kiln bench` scores it on those labels too, not by the cosine of its logits
    from kiln.bench import BenchSettings, bench

    (row,) = bench([art], settings=BenchSettings(batch_sizes=(8,), runs=1, warmup_runs=0)).rows
    assert row.fidelity["accuracy"] == pytest.approx(accuracy, abs=1.5 / len(ids)) and "mean_cosine" not in row.fidelity


def test_text_steps_report_real_tokens_and_tokens_per_second(
    make_settings: Callable[..., TrainSettings], topics_jsonl: Path
) -> None:
    from kiln.train import StepStats, TokenBudgetBatchSampler

    seen: list[StepStats] = []
    settings = make_settings(
        dataset=str(topics_jsonl), model="minilm", max_length=32, max_tokens=512, lora_rank=4, max_steps=2
    )
    train(settings, on_step=seen.append)
    data = load_jsonl(topics_jsonl, "text", "label", settings.test_fraction, settings.seed)
    lengths = [len(ids) for ids in TextBatcher(encoder_path("minilm"), 32).encode(data.texts_train)]
    batches = TokenBudgetBatchSampler(lengths, 512, seed=settings.seed).epoch_batches(0)
    assert [s.tokens for s in seen] == [sum(lengths[i] for i in rows) for rows in batches[:2]]  # padding not counted
    assert all(s.tokens_per_s > s.samples_per_s > 0 for s in seen)


def test_a_hugging_face_encoder_fine_tunes_with_its_dropout_on(
    make_settings: Callable[..., TrainSettings], make_trainer: Callable[..., Any], topics_jsonl: Path
) -> None:
    """from_pretrained leaves the encoder in eval mode under a classifier in train mode: the trainer used to check
    only the root's flag, so MiniLM fine-tuned without its dropout."""
    settings = make_settings(dataset=str(topics_jsonl), model="minilm", max_length=32, max_tokens=256)
    trainer = make_trainer(settings)
    seen: list[bool] = []
    for module in (m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)):
        module.register_forward_hook(lambda module, _inputs, _output: seen.append(module.training))
    trainer.train_step()
    assert len(seen) >= 12  # MiniLM: a dropout module after the attention and the FFN of each of its 6 layers
    assert all(seen)
