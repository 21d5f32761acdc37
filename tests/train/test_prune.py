"""Structured pruning: tensors really shrink, the right units go, and a pruned run fine-tunes and exports."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.runtime import OrtEngine
from kiln.train import TrainSettings, train
from kiln.train.models import cnn, mlp
from kiln.train.prune import count_params, prune_model
from kiln.train.text import TextClassifier


def _zero_units(layer: nn.Linear | nn.Conv2d, units: list[int]) -> None:
    with torch.no_grad():
        layer.weight[units] = 0.0
        if layer.bias is not None:
            layer.bias[units] = 0.0


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_mlp_pruning_removes_the_dead_units_and_keeps_the_function(importance: str) -> None:
    torch.manual_seed(0)
    net = mlp(6, (8, 6), 3)  # Linear(6,8) ReLU Linear(8,6) ReLU Linear(6,3)
    _zero_units(net[0], [1, 4, 5, 7])  # dead units: removing them cannot change the output
    _zero_units(net[2], [0, 2, 3])
    x = torch.randn(16, 6)
    before = net(x)
    batches = [{"x": x, "y": torch.randint(0, 3, (16,))}]

    def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum")

    report = prune_model(net, 0.5, importance=importance, loss_sum=loss_sum, batches=batches)
    assert report.units == {"0": [8, 4], "2": [6, 3]}
    assert [tuple(m.weight.shape) for m in net if isinstance(m, nn.Linear)] == [(4, 6), (3, 4), (3, 3)]
    assert report.params_after == count_params(net) < report.params_before
    torch.testing.assert_close(net(x), before)


def test_cnn_pruning_maps_channels_through_flatten_to_the_head() -> None:
    torch.manual_seed(0)
    net = cnn(64, (8, 16), 10)  # SquareImage Conv(1,8) ReLU Conv(8,16) ReLU MaxPool Flatten Linear(16*16, 10)
    _zero_units(net[1], [1, 2, 5, 6])  # half of each conv's channels are dead
    _zero_units(net[3], [0, 3, 5, 6, 9, 10, 12, 15])
    x = torch.randn(5, 64)
    before = net(x)
    report = prune_model(net, 0.5)
    assert report.units == {"1": [8, 4], "3": [16, 8]}
    assert net[3].weight.shape == (8, 4, 3, 3) and net[7].weight.shape == (10, 8 * 4 * 4)
    # the head's columns of the kept channels (4x4 pooled pixels each, channel-major) came along with them
    torch.testing.assert_close(net(x), before)


def _tiny_bert() -> TextClassifier:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return TextClassifier(BertModel(config).eval(), 32, 2)


def test_bert_heads_and_ffn_width_shrink_and_dead_ones_go() -> None:
    model = _tiny_bert()
    for block in model.encoder.encoder.layer:
        attention = block.attention.self
        dead = [i for head in (1, 2) for i in range(head * 8, head * 8 + 8)]  # heads 1 and 2 (head size 8)
        for proj in (attention.query, attention.key, attention.value):
            _zero_units(proj, dead)
        with torch.no_grad():
            block.attention.output.dense.weight[:, dead] = 0.0
        _zero_units(block.intermediate.dense, list(range(0, 64, 2)))  # GELU(0) = 0: half the FFN is dead
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    before = model(ids, mask)
    report = prune_model(model, 0.5)
    assert report.units["layer.0.heads"] == [4, 2] and report.units["layer.1.ffn"] == [64, 32]
    block = model.encoder.encoder.layer[0]
    assert block.attention.self.query.weight.shape == (16, 32)  # 2 heads x 8
    assert block.attention.output.dense.weight.shape == (32, 16) and block.intermediate.dense.weight.shape == (32, 32)
    torch.testing.assert_close(model(ids, mask), before)


def test_pruning_refuses_bad_ratios_and_unknown_structures(make_settings: Callable[..., TrainSettings]) -> None:
    with pytest.raises(ConfigError, match=r"prune_ratio is 1; it must be in \[0, 1\)"):
        make_settings(prune_ratio=1.0)
    with pytest.raises(ConfigError, match="cannot be combined with nproc > 1"):
        make_settings(prune_ratio=0.5, nproc=2)
    with pytest.raises(ConfigError, match=r'prune_importance "tailor" is unknown \(did you mean "taylor"\?\)'):
        make_settings(prune_ratio=0.5, prune_importance="tailor")

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.layer(x)
            return out

    with pytest.raises(ConfigError, match="cannot prune a Custom: structured pruning knows Sequential stacks"):
        prune_model(Custom(), 0.5)


def test_a_model_pruning_cannot_take_is_refused_before_training(
    make_settings: Callable[..., TrainSettings], factories_on_path: Path
) -> None:
    # refused after the whole run, whose checkpoints then stood in the way of a run without prune_ratio
    settings = make_settings(dataset="digits", model="kiln_train_test_models:two_layer_digits_module", prune_ratio=0.5)
    with pytest.raises(ConfigError, match="cannot prune a TwoLayers: structured pruning knows Sequential stacks"):
        train(settings)
    assert not Path(settings.checkpoint_dir).exists() or not any(Path(settings.checkpoint_dir).iterdir())


def test_pruned_digits_cnn_fine_tunes_and_exports_a_smaller_model(
    make_settings: Callable[..., TrainSettings],
) -> None:
    """The bar: the exported ONNX file and the parameter count shrink; accuracy stays within 2 points."""
    dense_settings = make_settings(
        dataset="digits", model="cnn", hidden_sizes=(16, 32), epochs=6, lr=3e-3, schedule="cosine", export=True
    )
    dense = train(dense_settings)
    # a finished run resumed with prune_ratio: pruned from the very weights the dense artifact holds
    pruned = train(dataclasses.replace(dense_settings, name="pruned", resume="latest", prune_ratio=0.5, prune_epochs=3))
    assert dense.artifact is not None and pruned.artifact is not None
    metrics = pruned.metrics
    assert metrics["dense_test_accuracy"] == dense.metrics["test_accuracy"]  # same seed: the same dense phase
    assert metrics["params"] < 0.45 * metrics["params_dense"]  # conv2 loses 3/4 of its weights, conv1 half
    assert metrics["test_accuracy"] >= dense.metrics["test_accuracy"] - 0.02
    assert pruned.steps == dense.steps + 3 * 43  # 1,347 rows: 43 batches of 32 per fine-tune epoch
    dense_bytes = dense.artifact.model_path.stat().st_size
    pruned_bytes = pruned.artifact.model_path.stat().st_size
    assert pruned_bytes < 0.6 * dense_bytes  # 9,930 -> 3,818 parameters; the graph itself does not shrink
    shapes = {i.name: list(i.dims) for i in onnx.load(str(pruned.artifact.model_path)).graph.initializer}
    assert [16, 8, 3, 3] in shapes.values()  # conv2: 16 of 32 channels, over 8 of 16 inputs
    record = pruned.artifact.manifest.provenance["train"]["pruning"]
    assert record["units"] == {"1.1": [16, 8], "1.3": [32, 16]} and record["finetune_steps"] == 3 * 43
    from kiln.data import bundled_dataset

    test = bundled_dataset("digits", test_fraction=0.25, seed=0)
    logits = OrtEngine(pruned.artifact.model_path).run({"input": test.x_test})["logits"]
    assert float((np.argmax(logits, axis=1) == test.y_test).mean()) == pytest.approx(metrics["test_accuracy"])
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(pruned.table())
    assert f"{int(metrics['params']):,}" in console.export_text()  # a count, not 3818.0000


def test_tabular_steps_report_no_tokens(make_settings: Callable[..., TrainSettings]) -> None:
    from kiln.train import StepStats

    seen: list[StepStats] = []
    train(make_settings(max_steps=2), on_step=seen.append)
    assert [(s.tokens, s.tokens_per_s) for s in seen] == [(0, 0.0), (0, 0.0)]


@pytest.mark.slow
def test_pruned_minilm_loses_heads_and_ffn_width_and_still_classifies(
    make_settings: Callable[..., TrainSettings], topics_jsonl: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        dataset=str(topics_jsonl), model="minilm", max_length=64, max_tokens=1024, epochs=1, lr=5e-5, export=True
    )
    result = train(dataclasses.replace(settings, prune_ratio=0.5, prune_epochs=2))
    assert result.metrics["params"] < 0.8 * result.metrics["params_dense"]  # the embeddings are not pruned
    assert result.metrics["test_accuracy"] >= result.metrics["dense_test_accuracy"] - 0.05
    assert result.artifact is not None
    shapes = [list(i.dims) for i in onnx.load(str(result.artifact.model_path)).graph.initializer]
    assert [1536, 384] not in shapes and [384, 1536] not in shapes  # no full-width (1,536) FFN weight is left
    assert [384, 768] in shapes or [768, 384] in shapes
    # the fuser of `kiln optimize` finds attention by the heads every layer kept and their width: with the config's
    # 12 heads (or 0, "find them") it fused no Attention node of a pruned encoder
    source = result.artifact.manifest.provenance["source"]
    assert (source["num_attention_heads"], source["hidden_size"]) == (6, 192)
    from kiln.optimize.passes import fuse_transformer

    heads, width = source["num_attention_heads"], source["hidden_size"]
    fused = fuse_transformer(result.artifact.model_path, tmp_path / "fused.onnx", num_heads=heads, hidden_size=width)
    assert fused["fusions"].get("Attention") == 6
    from kiln.runtime import OrtEngine

    ids = np.random.default_rng(0).integers(1000, 20000, (3, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    plain, fused_out = (
        OrtEngine(p).run(feeds)["logits"] for p in (result.artifact.model_path, tmp_path / "fused.onnx")
    )
    np.testing.assert_allclose(fused_out, plain, atol=1e-4)
