"""``nproc = 2``: two torchrun workers (gloo on CPU) take the same steps one process takes on the whole batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kiln.train import Checkpointer, TrainSettings, train


def test_two_processes_equal_one_on_the_same_global_batch(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    common = {"dataset": "digits", "max_steps": 6, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "cpu_threads": 1}
    two = train(make_settings(nproc=2, checkpoint_dir=str(tmp_path / "two"), **common))
    one = train(make_settings(nproc=1, checkpoint_dir=str(tmp_path / "one"), **common))
    assert two.steps == one.steps == 6
    assert [h["loss"] for h in two.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    a, b = Checkpointer(tmp_path / "two").load()["model"], Checkpointer(tmp_path / "one").load()["model"]
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6)
    assert two.metrics["test_accuracy"] == pytest.approx(one.metrics["test_accuracy"], abs=1 / 450)
