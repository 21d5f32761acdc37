"""``kiln train``: efficient, crash-safe training on Accelerate that ends in a Kiln artifact.

Example:
    >>> from kiln.train import TrainSettings, train
    >>> result = train(TrainSettings(dataset="digits", epochs=3, out="kiln-repo"))  # doctest: +SKIP
    >>> result.artifact.path, result.metrics["test_accuracy"]  # doctest: +SKIP
    (PosixPath('kiln-repo/digits/1'), 0.96...)
"""

from __future__ import annotations

from kiln.errors import CheckpointError, NonFiniteLoss, TrainingDiverged
from kiln.train.accumulate import accumulate_gradients
from kiln.train.checkpoint import Checkpointer
from kiln.train.loop import StepStats
from kiln.train.runner import TrainResult, train
from kiln.train.sampling import ShuffledBatchSampler, TokenBudgetBatchSampler
from kiln.train.settings import TrainSettings, load_train_settings

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NonFiniteLoss",
    "ShuffledBatchSampler",
    "StepStats",
    "TokenBudgetBatchSampler",
    "TrainResult",
    "TrainSettings",
    "TrainingDiverged",
    "accumulate_gradients",
    "load_train_settings",
    "train",
]
