"""PyTorch eager engine, so bench can put the source model beside its ONNX variants."""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.errors import InvalidInput
from kiln.types import NUMPY_TO_V2, Feeds, TensorSpec


class TorchEngine:
    """Runs an ``nn.Module`` (inference mode, CPU or CUDA) on numpy feeds.

    Inputs are passed positionally in ``input_specs`` order; a tuple of outputs is named by ``output_specs``.
    """

    def __init__(
        self,
        module: Any,
        input_specs: list[TensorSpec],
        output_specs: list[TensorSpec],
        *,
        name: str = "pytorch-eager",
        device: str = "cpu",
    ) -> None:
        self.name = name
        self._module = module.eval().to(device)
        self._device = device
        self._inputs = input_specs
        self._outputs = output_specs

    @property
    def module(self) -> Any:
        """The wrapped ``nn.Module`` (in eval mode, on the engine's device)."""
        return self._module

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, feeds: Feeds) -> Feeds:
        import torch

        missing = [s.name for s in self._inputs if s.name not in feeds]
        if missing:  # as OrtEngine says it, not a bare KeyError
            needs = ", ".join(s.name for s in self._inputs)
            raise InvalidInput(f'input "{missing[0]}" is missing; this model needs {needs}', input=missing[0])
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])).to(self._device) for s in self._inputs]
        with torch.inference_mode():
            result = self._module(*args)
        if not isinstance(result, tuple | list):
            result = (result,)
        return {
            spec.name: value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
            for spec, value in zip(self._outputs, result, strict=True)
        }


def spec_of(name: str, array: np.ndarray[Any, Any], dynamic_axes: tuple[int, ...] = (0,)) -> TensorSpec:
    """A TensorSpec for an example array, with the given axes marked dynamic."""
    shape = tuple(-1 if i in dynamic_axes else int(d) for i, d in enumerate(array.shape))
    return TensorSpec(name=name, dtype=NUMPY_TO_V2[array.dtype.name], shape=shape)
