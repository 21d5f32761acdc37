"""TorchEngine: the PyTorch source engine that kiln bench runs beside the ONNX ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import InvalidInput
from kiln.runtime import TorchEngine
from kiln.types import TensorSpec


def test_a_missing_feed_is_invalid_input_naming_it_not_a_key_error() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2)
    engine = TorchEngine(module, [TensorSpec("input", "FP32", (-1, 4))], [TensorSpec("scores", "FP32", (-1, 2))])
    x = np.ones((3, 4), dtype=np.float32)
    np.testing.assert_allclose(engine.run({"input": x})["scores"], module(torch.from_numpy(x)).detach().numpy())
    with pytest.raises(InvalidInput, match='input "input" is missing; this model needs input') as info:
        engine.run({"inputs": x})
    assert info.value.details == {"input": "input"}
