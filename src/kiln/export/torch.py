"""PyTorch ``nn.Module`` -> ONNX, with dynamic axes kept and checked."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from kiln._utils import import_factory
from kiln.errors import ConfigError, ExportError, InvalidInput, KilnError
from kiln.types import Feeds

logger = logging.getLogger(__name__)
ExampleInputs = Any  # Tensor | ndarray | tuple of them | mapping name -> tensor/ndarray


def as_feeds(example_inputs: ExampleInputs, input_names: Sequence[str] | None) -> Feeds:
    """Normalise example inputs to an ordered name -> numpy mapping."""
    if isinstance(example_inputs, Mapping):
        items = list(example_inputs.items())
    else:
        values = list(example_inputs) if isinstance(example_inputs, tuple | list) else [example_inputs]
        names = list(input_names or (["input"] if len(values) == 1 else [f"input_{i}" for i in range(len(values))]))
        if len(names) != len(values):
            raise InvalidInput(
                f"{len(values)} example inputs but {len(names)} input names ({names}); give one per input"
            )
        items = list(zip(names, values, strict=True))
    feeds: Feeds = {}
    for name, value in items:
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if array.ndim == 0:
            raise InvalidInput(f'example input "{name}" is a scalar; pass a batch (first axis = rows)', input=name)
        feeds[str(name)] = array
    return feeds


def grow_batch(feeds: Feeds) -> Feeds:
    """The same feeds with one more row, to prove the batch axis is dynamic."""
    return {k: np.concatenate([v, v[:1]], axis=0) for k, v in feeds.items()}


def torch_reference(module: Any, output_names: Sequence[str]) -> Any:
    """A callable running ``module`` on numpy feeds (positional, in feed order) returning named numpy outputs."""
    import torch

    def run(feeds: Feeds) -> Feeds:
        with torch.inference_mode():
            result = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()))
        if not isinstance(result, tuple | list):
            result = (result,)
        return {n: r.detach().cpu().numpy() for n, r in zip(output_names, result, strict=True)}

    return run


def match_module_dtype(module: Any, feeds: Feeds) -> Feeds:
    """The feeds with float inputs cast to the module's float parameter dtype (float64 numpy data -> float32).

    NumPy makes float64 by default while most modules hold float32 weights; torch refuses to mix them
    ("mat1 and mat2 must have the same dtype"). Integer inputs (token ids, indices) are left alone.
    """
    import torch

    numpy_of: dict[Any, np.dtype[Any]] = {
        torch.float16: np.dtype(np.float16),
        torch.float32: np.dtype(np.float32),
        torch.float64: np.dtype(np.float64),
    }
    float_dtypes = {p.dtype for p in [*module.parameters(), *module.buffers()] if p.dtype.is_floating_point}
    # No float weights, mixed precision on purpose, or bfloat16 (no numpy twin): the inputs are the user's call.
    if len(float_dtypes) != 1 or (want := numpy_of.get(float_dtypes.pop())) is None:
        return feeds
    cast: Feeds = {}
    for name, array in feeds.items():
        if array.dtype.kind == "f" and array.dtype != want:
            logger.info('example input "%s" is %s; casting it to the model\'s %s', name, array.dtype, want)
            array = array.astype(want)
        cast[name] = array
    return cast


def count_outputs(module: Any, feeds: Feeds) -> int:
    """Run ``module`` once on the example feeds; InvalidInput when it cannot take them (wrong shape, say)."""
    import torch

    try:
        with torch.inference_mode():
            result = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()))
    except Exception as exc:
        shapes = ", ".join(f"{name} {list(v.shape)} {v.dtype}" for name, v in feeds.items())
        raise InvalidInput(
            f"{type(module).__name__} cannot run on the example inputs ({shapes}): {_first_line(exc)}; pass example "
            "inputs of the shape and dtype its forward() takes (--example-shape, or --dataset rows that fit)",
            shapes={name: list(v.shape) for name, v in feeds.items()},
        ) from exc
    return len(result) if isinstance(result, tuple | list) else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def export_module(
    module: Any,
    feeds: Feeds,
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    *,
    opset: int,
    exporter: str,
    workdir: Path,
) -> Path:
    """Write ``module`` as ONNX into ``workdir`` and return the file.

    ``exporter`` is ``"dynamo"`` (torch.export-based, PyTorch's default) or ``"torchscript"`` (tracing). The
    TorchScript graph of a Hugging Face encoder with eager attention is the one ONNX Runtime's transformer
    optimizer knows how to fuse, which is why the HF path uses it.
    """
    import torch

    _check_opset(opset, exporter)
    path = workdir / "model.onnx"
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    names = list(feeds)
    try:
        if exporter == "torchscript":
            with warnings.catch_warnings():
                # NOTE: the legacy exporter is deprecated upstream but is still the one whose graphs ORT fuses.
                warnings.simplefilter("ignore", DeprecationWarning)
                # Tracing warns on every Python branch over a tensor; under `-W error` such a warning would abort the
                # trace. Dynamic axes are proven afterwards by the two-shape parity run, not by these warnings.
                from torch.jit._trace import TracerWarning

                warnings.simplefilter("ignore", TracerWarning)
                # Hugging Face's attention masks index with aranges, which are never negative; the warning that
                # negative indices would export wrongly is about a case those graphs cannot hit, and the parity
                # gate runs two shapes
                warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    input_names=names,
                    output_names=list(output_names),
                    dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                    opset_version=opset,
                    dynamo=False,
                )
        elif exporter == "dynamo":
            # Positional, in forward() order: torch.export keys a dict by forward()'s parameter names, not by
            # Kiln's input names ("input", "input_0", ...), and rejects any other keys.
            shapes = tuple(
                dict.fromkeys(dynamic_axes.get(name, {}), torch.export.Dim.DYNAMIC) or None for name in names
            )
            # NOTE: the exporter warns once per torchvision op it cannot register when torchvision is absent
            # (4 lines on every export); Kiln needs none of them
            registration = logging.getLogger("torch.onnx._internal.exporter._registration")
            with warnings.catch_warnings(), _level(registration, logging.ERROR):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    args,
                    input_names=names,
                    output_names=list(output_names),
                    dynamic_shapes=shapes,
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
            assert program is not None
            program.save(str(path))
        else:
            raise InvalidInput(f'exporter "{exporter}" is unknown; use "dynamo" or "torchscript"', exporter=exporter)
    except InvalidInput:
        raise
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export ({exporter}) failed for {type(module).__name__}: {str(exc).strip().splitlines()[0]}; "
            f"try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'} or simplify the forward()",
            exporter=exporter,
        ) from exc
    return path


@contextmanager
def _level(logger: logging.Logger, level: int) -> Iterator[None]:
    """``logger`` at ``level`` inside the block, its own level again after."""
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _check_opset(opset: int, exporter: str) -> None:
    """Refuse an opset the chosen exporter cannot write, before it fails deep inside with advice that does not fit.
    The dynamo exporter writes opset 18 and up: it raised a lower one to 18, and the manifest said otherwise."""
    import torch

    try:
        from torch.onnx import _constants  # NOTE: private, but the only place torch states its range

        low = 18 if exporter == "dynamo" else int(_constants.ONNX_MIN_OPSET)
        high = int(
            _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET if exporter == "torchscript" else _constants.ONNX_MAX_OPSET
        )
    except (ImportError, AttributeError):  # another torch: its exporter's own error will have to do
        return
    if not low <= opset <= high:
        default = 18 if exporter == "dynamo" else 17
        other = " or --exporter torchscript" if exporter == "dynamo" and opset < low else ""
        raise ConfigError(
            f"opset {opset} is outside {low}..{high}, the ONNX opsets the {exporter} exporter of torch "
            f"{torch.__version__} writes; pass --opset {min(max(opset, low), high)}{other} (or leave --opset out: "
            f"{default} is the default)",
            opset=opset,
            exporter=exporter,
        )


def load_factory(spec: str, weights: Path | None = None) -> Any:
    """Build a module from ``package.module:factory`` and optionally load safetensors weights into it.

    Raises:
        InvalidInput: the factory is not a callable taking no arguments, fails, or returns no ``nn.Module``; the
            weights file is missing, not safetensors, or does not fit the module.
    """
    import inspect

    import torch

    factory = import_factory(spec, "mypkg.models:build_cnn")
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:  # not callable, or it has required parameters
        raise InvalidInput(
            f'factory "{spec}" cannot be called without arguments ({exc}); point --model at a function (or class) '
            "that builds the model with no arguments, e.g. def build_cnn(): return CNN(channels=8)",
            model=spec,
        ) from exc
    except ValueError:  # no signature to inspect (some builtins): calling it tells
        pass
    try:
        model = factory()
    except KilnError:
        raise
    except Exception as exc:
        raise InvalidInput(
            f'factory "{spec}" raised {type(exc).__name__}: {_first_line(exc)}; fix the factory (run with --debug '
            "for the traceback)",
            model=spec,
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(
            f'factory "{spec}" returned an object of type {type(model).__name__}, not a torch.nn.Module; '
            "return the model",
            model=spec,
        )
    if weights is not None:
        _load_weights(model, spec, weights)
    return model.eval()


def _load_weights(model: Any, spec: str, weights: Path) -> None:
    if not weights.is_file():
        raise InvalidInput(f'weights file "{weights}" does not exist', path=str(weights))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise InvalidInput(
            f'weights file "{weights}" is not a readable safetensors file ({_first_line(exc)}); save it with '
            "safetensors.torch.save_file(model.state_dict(), path)",
            path=str(weights),
        ) from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # torch lists every missing/unexpected key and size mismatch, one per line; the first few say enough.
        details = [line.strip().rstrip(".") for line in str(exc).strip().splitlines()[1:] if line.strip()]
        raise InvalidInput(
            f'weights file "{weights}" does not fit the model built by "{spec}": {"; ".join(details[:3]) or exc}'
            f"{' ...' if len(details) > 3 else ''}; pass the weights saved from this model's state_dict()",
            path=str(weights),
            model=spec,
        ) from exc


def temp_workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="kiln-export-")
