"""Checkpoints: atomic pointer, pruning, RNG capture, and clear errors for corrupt or missing files."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError
from kiln.train import Checkpointer, CheckpointError, StepStats, TrainSettings, train
from kiln.train.checkpoint import capture_rng, restore_rng


def _state(value: float) -> dict[str, object]:
    return {"model": {"w": torch.full((3,), value)}, "settings": {"seed": 0}}


def test_save_load_round_trip_and_pruning(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    for step in (5, 10, 15):
        ckpt.save(step, _state(float(step)))
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*.pt")) == ["step-00000010.pt", "step-00000015.pt"]
    pointer = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    assert pointer["step"] == 15 and len(pointer["sha256"]) == 64
    loaded = ckpt.load()
    assert loaded["step"] == 15
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 15.0))
    assert not list((tmp_path / "ckpt").glob(".*"))  # no temp files left behind


def test_rng_capture_restores_every_generator() -> None:
    state = capture_rng()
    before = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    after = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert before == after


def test_a_corrupt_checkpoint_is_refused_and_the_earlier_one_named(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1.0))
    latest = ckpt.save(2, _state(2.0)).path
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: a bad disk, a partial copy
    latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt: its sha256 differs.*--resume-from .*step-00000001\.pt"):
        ckpt.load()
    assert latest.exists()  # nothing deleted
    assert ckpt.load(tmp_path / "step-00000001.pt")["step"] == 1


def test_a_truncated_checkpoint_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "step-00000007.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r'checkpoint ".*step-00000007.pt" cannot be read'):
        Checkpointer(tmp_path).load(bad)


def test_resume_without_a_checkpoint_says_where_it_looked(make_settings: Callable[..., TrainSettings]) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* to resume from"):
        train(make_settings(resume="latest"))


def test_a_fresh_run_does_not_overwrite_an_existing_one(make_settings: Callable[..., TrainSettings]) -> None:
    train(make_settings(max_steps=2))
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint of a run \(step 2\); resume it"):
        train(make_settings(max_steps=4))


def test_resume_refuses_settings_that_change_the_run(make_settings: Callable[..., TrainSettings]) -> None:
    train(make_settings(max_steps=2))
    with pytest.raises(ConfigError, match=r"cannot resume: these settings differ .*lr: 0.001 -> 0.01"):
        train(make_settings(max_steps=4, lr=0.01, resume="latest"))


def test_resume_in_process_continues_exactly(make_settings: Callable[..., TrainSettings], tmp_path: Path) -> None:
    """Stop at step 7 (mid-epoch), resume to 12: the same weights as 12 steps in one go (dropout on)."""
    common = {"dataset": "digits", "batch_size": 64, "dropout": 0.3, "checkpoint_every": 0}
    train(make_settings(max_steps=12, checkpoint_dir=str(tmp_path / "a"), **common))
    train(make_settings(max_steps=7, checkpoint_dir=str(tmp_path / "b"), **common))
    resumed = train(make_settings(max_steps=12, checkpoint_dir=str(tmp_path / "b"), resume="latest", **common))
    assert resumed.resumed_from_step == 7
    one_go, two_goes = Checkpointer(tmp_path / "a").load(), Checkpointer(tmp_path / "b").load()
    assert two_goes["sampler"]["position"] != 0
    for key, value in one_go["model"].items():
        assert torch.equal(value, two_goes["model"][key]), key


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_running_step_and_checkpoints_it(
    make_settings: Callable[..., TrainSettings], tmp_path: Path, signum: int
) -> None:
    """Ctrl-C / SIGTERM land between steps: the run stops after step 5, writes it, and a resume continues."""
    before = signal.getsignal(signum)

    def interrupt_at_five(stats: StepStats) -> None:
        if stats.step == 5:
            os.kill(os.getpid(), signum)

    settings = make_settings(dataset="digits", max_steps=9, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(settings, on_step=interrupt_at_five)
    assert Checkpointer(tmp_path / "ckpt").load()["step"] == 5
    assert signal.getsignal(signum) is before  # the handler was put back
    assert train(make_settings(dataset="digits", max_steps=9, resume="latest")).resumed_from_step == 5
