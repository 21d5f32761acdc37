"""Shared fixtures: tiny real ONNX models and an artifact written with ``kiln.artifact.write``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import artifact as artifacts
from kiln.types import Signature, TensorSpec

TINY_INPUT = TensorSpec(name="input", dtype="FP32", shape=(-1, 4))
TINY_OUTPUT = TensorSpec(name="probabilities", dtype="FP32", shape=(-1, 3))
TINY_OPSET = 17
TINY_IR_VERSION = 8  # every onnxruntime Kiln supports reads IR 8


Array = np.ndarray[Any, Any]


@pytest.fixture
def tiny_weights() -> tuple[Array, Array]:
    """The tiny classifier's weight (4, 3) and bias (3,), so a test can compute the expected output."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)


@pytest.fixture
def tiny_onnx_model(tmp_path: Path, tiny_weights: tuple[Array, Array]) -> Path:
    """A real MatMul + Add + Softmax classifier: ``input`` FP32 [N, 4] -> ``probabilities`` FP32 [N, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = tiny_weights
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weight"], ["logits_no_bias"]),
            helper.make_node("Add", ["logits_no_bias", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)])
    model.ir_version = TINY_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def make_manifest() -> Callable[..., artifacts.Manifest]:
    """A factory for fresh manifests of the tiny classifier: ``make_manifest(name="tiny", **fields)``."""

    def make(name: str = "tiny", **fields: Any) -> artifacts.Manifest:
        signature = Signature(inputs=(TINY_INPUT,), outputs=(TINY_OUTPUT,))
        return artifacts.Manifest(name=name, signature=signature, **{"task": "classification", **fields})

    return make


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def tiny_artifact(
    repository: Path, tiny_onnx_model: Path, make_manifest: Callable[..., artifacts.Manifest]
) -> artifacts.Artifact:
    """The tiny classifier written as version 1 of model "tiny" in a fresh repository."""
    return artifacts.write(repository, make_manifest(), tiny_onnx_model)


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory: pytest.TempPathFactory) -> artifacts.Artifact:
    """all-MiniLM-L6-v2 from the bundled package, exported once per session (about half a minute)."""
    from kiln.export import bundled_minilm_path, export

    return export(bundled_minilm_path(), out=tmp_path_factory.mktemp("minilm-repo"), name="minilm")
