"""Fixtures for the train tests: small settings, this folder on the import path for model factories."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.train import TrainSettings
from kiln.train.loop import Trainer

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: 2 OpenMP threads fight (25x slower steps measured), 1 does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def factories_on_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put ``kiln_train_test_models`` on ``sys.path`` for in-process runs; returns the folder (for PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(HERE))
    return HERE


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., TrainSettings]:
    """Settings for a quick, quiet run in ``tmp_path``: no tracking and no export unless a test asks for them."""

    def make(**overrides: Any) -> TrainSettings:
        base: dict[str, Any] = {
            "dataset": "iris",
            "hidden_sizes": (16,),
            "epochs": 2,
            "track": False,
            "export": False,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "out": str(tmp_path / "repo"),
        }
        return TrainSettings(**(base | overrides))

    return make


@pytest.fixture
def make_trainer() -> Callable[..., Trainer]:
    """A Trainer over a settings' workload on the CPU, with the settings' lr schedule (constant by default) over
    100 steps, without mixed precision unless ``accelerator`` says otherwise, padding text batches as the run
    does; ``trainer_args`` (sizer, optimizer_kind, ...) go to the Trainer."""
    from kiln.train.loop import make_accelerator
    from kiln.train.optim import lr_schedule, make_optimizer
    from kiln.train.workload import prepare_workload

    def make(settings: TrainSettings, *, accelerator: Any = None, **trainer_args: Any) -> Trainer:
        work = prepare_workload(settings, None)
        optimizer = make_optimizer(work.model, settings)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, 100))
        accelerator = accelerator or make_accelerator("cpu", "no")
        return Trainer(
            work.model, optimizer, scheduler, work.sampler, work.tensors, work.loss_sum, accelerator=accelerator,
            **({"collate": work.collate} | trainer_args),
        )  # fmt: skip

    return make


GROUPS = {"strings": ("string-methods", "formatstrings", "strings"), "errors": ("exceptions", "try", "raise")}


@pytest.fixture
def topics_jsonl(tmp_path: Path) -> Path:
    """Paragraphs of Python's help topics, labelled by topic group (strings vs errors): ~250 real rows."""
    from kiln.data import topic_paragraphs

    path = tmp_path / "topics.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for text, label in topic_paragraphs(GROUPS):
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.fixture
def pairs_jsonl(tmp_path: Path) -> Path:
    """40 real (first sentence, rest of the paragraph) pairs from Python's help topics, as JSONL."""
    from kiln.train.embedding import write_pydoc_pairs

    return write_pydoc_pairs(tmp_path / "pairs.jsonl", 40)


@pytest.fixture
def wine_csv(tmp_path: Path) -> Path:
    """The bundled wine data written as a CSV with named columns and string class labels."""
    from kiln.data import bundled_dataset
    from tests.helpers import write_csv

    data = bundled_dataset("wine", test_fraction=0.5)
    x = [*data.x_train, *data.x_test]
    y = [*data.y_train, *data.y_test]
    header = [f"chem_{i}" for i in range(x[0].shape[0])] + ["cultivar"]
    names = ["barolo", "grignolino", "barbera"]
    return write_csv(tmp_path / "wine.csv", [header] + [[*map(float, r), names[c]] for r, c in zip(x, y, strict=True)])
