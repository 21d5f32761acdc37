"""kiln.runtime.OrtEngine on a tiny real ONNX classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.errors import InvalidInput, ModelNotFound
from kiln.runtime import Engine, OrtEngine
from kiln.types import TensorSpec

Array = np.ndarray[Any, Any]


def expected_probabilities(x: Array, weight: Array, bias: Array) -> Array:
    logits = x.astype(np.float64) @ weight + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture
def engine(tiny_onnx_model: Path) -> OrtEngine:
    return OrtEngine(tiny_onnx_model, intra_op_threads=1)


def test_engine_reports_specs_with_dynamic_batch(engine: OrtEngine) -> None:
    assert engine.inputs == [TensorSpec("input", "FP32", (-1, 4))]
    assert engine.outputs == [TensorSpec("probabilities", "FP32", (-1, 3))]
    assert isinstance(engine, Engine)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_engine_runs_at_any_batch_size(engine: OrtEngine, tiny_weights: tuple[Array, Array], batch_size: int) -> None:
    x = np.random.default_rng(batch_size).normal(size=(batch_size, 4)).astype(np.float32)

    out = engine.run({"input": x})

    assert list(out) == ["probabilities"]
    assert out["probabilities"].shape == (batch_size, 3)
    assert out["probabilities"].dtype == np.float32
    np.testing.assert_allclose(out["probabilities"], expected_probabilities(x, *tiny_weights), rtol=1e-5, atol=1e-6)


def test_engine_casts_feeds_to_the_model_dtype(engine: OrtEngine) -> None:
    x64 = np.arange(8, dtype=np.float64).reshape(2, 4)
    np.testing.assert_array_equal(
        engine.run({"input": x64})["probabilities"], engine.run({"input": x64.astype(np.float32)})["probabilities"]
    )


def test_engine_loads_from_bytes(tiny_onnx_model: Path, engine: OrtEngine) -> None:
    from_bytes = OrtEngine(tiny_onnx_model.read_bytes(), intra_op_threads=1)
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_array_equal(
        from_bytes.run({"input": x})["probabilities"], engine.run({"input": x})["probabilities"]
    )


def test_engine_settings_record_the_knobs(tiny_onnx_model: Path) -> None:
    engine = OrtEngine(tiny_onnx_model, name="cpu-1t", providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert engine.name == "cpu-1t"
    assert engine.settings == {
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        "graph_optimization": "all",
    }


def test_unknown_input_name_suggests_the_right_one(engine: OrtEngine) -> None:
    with pytest.raises(
        InvalidInput, match=r'input "inputs" is not an input of this model \(did you mean "input"\?\); its inputs are'
    ) as info:
        engine.run({"inputs": np.zeros((1, 4), dtype=np.float32)})
    assert info.value.details == {"input": "inputs"}


def test_missing_input_names_what_is_needed(engine: OrtEngine) -> None:
    with pytest.raises(InvalidInput, match='input "input" is missing; this model needs input'):
        engine.run({})


def test_missing_model_file_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r'model file ".*absent\.onnx" does not exist'):
        OrtEngine(tmp_path / "absent.onnx")


# --- found in review: each failed before its fix ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "given"),
    [((4,), r"\[4\]"), ((2, 5), r"\[2, 5\]"), ((2, 4, 1), r"\[2, 4, 1\]")],
)
def test_a_feed_of_the_wrong_shape_names_the_input_and_both_shapes(
    engine: OrtEngine, shape: tuple[int, ...], given: str
) -> None:
    # was ONNX Runtime's "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input..." with a hint about
    # token ids
    with pytest.raises(
        InvalidInput, match=rf'input "input" has shape {given}; model .* takes \[-1, 4\] \(-1 = any size\)'
    ) as info:
        engine.run({"input": np.zeros(shape, dtype=np.float32)})
    assert "ONNXRuntimeError" not in str(info.value) and "token ids" not in str(info.value)
    assert info.value.details == {"input": "input", "expected": [-1, 4], "actual": list(shape)}


def test_a_feed_that_cannot_be_cast_to_the_input_dtype_is_invalid_input(engine: OrtEngine) -> None:
    # was numpy's ValueError "could not convert string to float", a stack trace
    with pytest.raises(InvalidInput, match=r'input "input" of model .* holds <U1 values that cannot be read as FP32'):
        engine.run({"input": np.array([["a", "b", "c", "d"]])})


def test_a_missing_input_is_named_in_the_details(engine: OrtEngine) -> None:
    with pytest.raises(InvalidInput) as info:
        engine.run({})
    assert info.value.details == {"input": "input"}
