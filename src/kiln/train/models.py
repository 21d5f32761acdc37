"""The models ``kiln train`` builds: a small MLP or CNN, or a user's ``package.module:factory``.

Built-in models carry their input standardisation (and, for regression, the target scale) as buffers, so the
exported ONNX graph takes raw features and returns predictions in the target's own units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln._utils import import_factory
from kiln.errors import InvalidInput

# Features whose training std is below this are constant there: they get unit scale, not a division by ~0 (a
# pixel that is 0 in every training image but 16 in a test one became 1.6e7, so the float model got that row
# wrong and static INT8's calibrated ranges blew up to chance accuracy).
_MIN_STD = 1e-6


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training set's statistics kept as buffers (exported with the model)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray[Any, Any], std: np.ndarray[Any, Any]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.where(std < _MIN_STD, 1.0, std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Rescale(nn.Module):
    """``y * scale + shift``: maps a standardised regression output back to the target's units."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, shift: float, scale: float) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.shift


class SquareImage(nn.Module):
    """``[N, side*side]`` -> ``[N, 1, side, side]`` (digits' 64 features are an 8x8 image)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, self.side, self.side)


def mlp(in_features: int, hidden_sizes: tuple[int, ...], out_features: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU(-Dropout) blocks, then a linear head."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def cnn(in_features: int, hidden_sizes: tuple[int, ...], out_features: int, dropout: float = 0.0) -> nn.Sequential:
    """Two 3x3 conv layers (channels from ``hidden_sizes``) over a square image, 2x2 max-pool, linear head."""
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise InvalidInput(
            f'model "cnn" needs square images, but the data has {in_features} features (not a square number); '
            'use model = "mlp" for tabular data',
            features=in_features,
        )
    channels = (*hidden_sizes, hidden_sizes[-1])[:2] if hidden_sizes else (16, 32)
    if side < 2:
        raise InvalidInput(f'model "cnn" needs images of at least 2x2 pixels; the data has {in_features} feature')
    pooled = side // 2
    layers: list[nn.Module] = [
        SquareImage(side),  # (N, 1, side, side)
        nn.Conv2d(1, channels[0], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels[0], channels[1], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, C, side/2, side/2)
        nn.Flatten(),  # (N, C * (side/2)^2)
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(channels[1] * pooled * pooled, out_features))
    return nn.Sequential(*layers)


def build_model(
    spec: str,
    *,
    x_train: np.ndarray[Any, Any],
    num_outputs: int,
    task: str,
    y_train: np.ndarray[Any, Any] | None = None,
    hidden_sizes: tuple[int, ...] = (64,),
    dropout: float = 0.0,
) -> nn.Module:
    """A built-in model (``"mlp"``/``"cnn"``, wrapped with standardisation) or the module a factory returns."""
    if spec in ("mlp", "cnn"):
        body = (mlp if spec == "mlp" else cnn)(x_train.shape[1], hidden_sizes, num_outputs, dropout)
        layers: list[nn.Module] = [Standardize(x_train.mean(axis=0), x_train.std(axis=0)), body]
        if task == "regression" and y_train is not None:
            layers.append(Rescale(float(y_train.mean()), float(max(y_train.std(), _MIN_STD))))
        return nn.Sequential(*layers)
    return load_factory(spec)


def load_factory(spec: str, **kwargs: Any) -> nn.Module:
    """Call ``package.module:factory`` (with ``kwargs``) and check it returns an ``nn.Module``."""
    model = import_factory(spec, "mypkg.models:build")(**kwargs)
    if not isinstance(model, nn.Module):
        raise InvalidInput(f'factory "{spec}" returned a {type(model).__name__}, not a torch nn.Module', model=spec)
    return model


def forward_rows(model: nn.Module, rows: np.ndarray[Any, Any], *, role: str, spec: str) -> torch.Tensor:
    """``model`` on float rows ``[N, F]``; a model whose input does not take ``F`` features is a clear error.

    ``role`` and ``spec`` name the model in the message (``"model"``/``"teacher"``, its factory).
    """
    try:
        out: torch.Tensor = model(torch.from_numpy(rows))
    except RuntimeError as exc:  # torch's shape errors ("mat1 and mat2 shapes cannot be multiplied ...")
        raise InvalidInput(
            f'{role} "{spec}" fails on a batch of {rows.shape[0]} rows of {rows.shape[1]} float32 features '
            f"({str(exc).splitlines()[0][:200]}); its input layer must take {rows.shape[1]} features",
            model=spec,
            features=int(rows.shape[1]),
        ) from exc
    return out


def check_output_shape(output: torch.Tensor, rows: int, num_outputs: int, task: str, dataset: str) -> None:
    """Refuse a model whose output does not fit the task, naming both shapes and the fix."""
    expected = [rows, num_outputs]
    ok = list(output.shape) == expected or (task == "regression" and list(output.shape) == [rows])
    if not ok:
        what = f"{num_outputs} classes" if task == "classification" else "one value per row"
        raise InvalidInput(
            f"the model returns shape {list(output.shape)} for a batch of {rows} rows, but {task} on "
            f'"{dataset}" needs {expected} ({what}); change the model\'s output layer to {num_outputs} units',
            expected=expected,
            received=list(output.shape),
        )
