"""Checkpoints: atomic pointer, pruning, RNG capture, and clear errors for corrupt or missing files."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError
from kiln.train import Checkpointer, CheckpointError, StepStats, TrainingDiverged, TrainSettings, train
from kiln.train.checkpoint import capture_rng, restore_rng
from kiln.train.loop import Trainer, make_accelerator


def _state(value: float) -> dict[str, object]:
    return {"model": {"w": torch.full((3,), value)}, "settings": {"seed": 0}}


def test_a_ranks_rng_states_round_trip_beside_the_checkpoint_and_are_pruned_as_it_is(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    draws = {}
    for step in (5, 10, 15):
        torch.manual_seed(step)
        ckpt.save_rank_rng(step, rank=1)
        draws[step] = torch.rand(4)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.rng")) == [
        "step-00000010.rank-1.rng",
        "step-00000015.rank-1.rng",
    ]
    state = Checkpointer.load_rank_rng(tmp_path / "ckpt" / "step-00000010.pt", 10, rank=1)
    assert state is not None
    restore_rng(state)
    assert torch.equal(torch.rand(4), draws[10])
    assert Checkpointer.load_rank_rng(tmp_path / "ckpt" / "step-00000010.pt", 10, rank=2) is None  # never written
    (tmp_path / "ckpt" / "step-00000015.rank-1.rng").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=r"rank 1's RNG states at step 15\) cannot be read .*delete it"):
        Checkpointer.load_rank_rng(tmp_path / "ckpt" / "step-00000015.pt", 15, rank=1)


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


def test_resuming_from_a_pruned_checkpoint_names_the_ones_that_exist(tmp_path: Path) -> None:
    # the README's --resume-from step-00000100.pt: a run keeps its last two, so early steps are gone
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    for step in (5, 10, 15):
        ckpt.save(step, _state(float(step)))
    with pytest.raises(CheckpointError, match=r"holds step-00000010\.pt, step-00000015\.pt .*keep_checkpoints"):
        ckpt.load(tmp_path / "ckpt" / "step-00000005.pt")
    with pytest.raises(CheckpointError, match="pass a step-\\*\\.pt file of the run's checkpoint_dir"):
        ckpt.load(tmp_path / "elsewhere" / "step-00000005.pt")


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


def test_a_fresh_run_does_not_write_among_checkpoints_without_their_pointer(
    make_settings: Callable[..., TrainSettings],
) -> None:
    # with latest.json gone, a fresh run wrote its step-4 beside another run's step-6 and step-8 (and over any of
    # the same number)
    first = make_settings(max_steps=4, checkpoint_every=2)
    train(first)
    (Path(first.checkpoint_dir) / "latest.json").unlink()
    before = sorted(p.name for p in Path(first.checkpoint_dir).iterdir())
    with pytest.raises(CheckpointError, match=r"holds checkpoints \(step-00000004.pt and 1 more\) but no latest.json"):
        train(make_settings(max_steps=4, seed=5))
    assert sorted(p.name for p in Path(first.checkpoint_dir).iterdir()) == before


def test_resume_refuses_settings_that_change_the_run(make_settings: Callable[..., TrainSettings]) -> None:
    train(make_settings(max_steps=2))
    with pytest.raises(ConfigError, match=r"cannot resume: these settings differ .*weight_decay: 0.0 -> 0.01"):
        train(make_settings(max_steps=4, weight_decay=0.01, resume="latest"))


def test_resuming_a_finished_run_with_no_steps_left_writes_nothing(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    # it exported a new version whose kiln.json held final_loss NaN, which is not JSON
    train(make_settings(export=True))
    for epochs in (2, 1):
        with pytest.raises(ConfigError, match=r"already trained 8 steps, and epochs = \d leaves none to train; raise"):
            train(make_settings(export=True, epochs=epochs, resume="latest"))
    assert sorted(p.name for p in (tmp_path / "repo" / "iris").iterdir()) == ["1", "config.pbtxt"]
    assert train(make_settings(export=True, epochs=3, schedule="constant", resume="latest")).steps == 12


def test_resume_refuses_a_dataset_file_that_changed_since_the_checkpoint(
    make_settings: Callable[..., TrainSettings], wine_csv: Path
) -> None:
    # rows appended: the run resumed silently on another split; a column added: an internal "size mismatch" crash
    common = {"dataset": str(wine_csv), "target": "cultivar", "max_steps": 2}
    train(make_settings(**common))
    original = wine_csv.read_bytes()
    lines = original.decode().splitlines()
    wine_csv.write_bytes(original + ("\n".join(lines[1:4]) + "\n").encode())
    with pytest.raises(ConfigError, match=r'the dataset file ".*" changed since the checkpoint was written'):
        train(make_settings(**(common | {"max_steps": 4}), resume="latest"))
    wine_csv.write_text("\n".join(f"{line},1" for line in lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"changed since the checkpoint was written"):
        train(make_settings(**(common | {"max_steps": 4}), resume="latest"))
    wine_csv.write_bytes(original)
    assert train(make_settings(**(common | {"max_steps": 4}), resume="latest")).resumed_from_step == 2


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


def test_only_a_constant_schedule_may_change_its_length_on_resume(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    """epochs/max_steps set how long a decaying lr decays: a new length would move the lr of every resumed step."""
    for schedule in ("linear", "cosine"):
        ckpt = str(tmp_path / schedule)
        train(make_settings(epochs=2, schedule=schedule, checkpoint_dir=ckpt))
        with pytest.raises(
            ConfigError, match=rf'cannot resume with epochs: 2 -> 4: with schedule = "{schedule}".*keep epochs = 2, or'
        ):
            train(make_settings(epochs=4, schedule=schedule, checkpoint_dir=ckpt, resume="latest"))
    ckpt = str(tmp_path / "constant")
    train(make_settings(epochs=2, warmup_steps=3, checkpoint_dir=ckpt))
    extended = train(make_settings(epochs=4, warmup_steps=3, checkpoint_dir=ckpt, resume="latest"))
    assert extended.steps == 16  # iris: 4 steps an epoch


def test_resume_from_a_file_when_the_pointer_is_corrupt(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    """The corrupt-pointer error says to resume with --resume-from; that resume must then work."""
    train(make_settings(max_steps=4, checkpoint_every=2))
    (tmp_path / "ckpt" / "latest.json").write_text('{"step": 4, "fi')
    with pytest.raises(CheckpointError, match=r"not a valid checkpoint pointer .* resume from one of them with"):
        train(make_settings(max_steps=6, resume="latest"))
    resumed = train(make_settings(max_steps=6, resume=str(tmp_path / "ckpt" / "step-00000002.pt")))
    assert (resumed.resumed_from_step, resumed.steps) == (2, 6)
    assert Checkpointer(tmp_path / "ckpt").load()["step"] == 6


def test_a_branch_from_an_earlier_checkpoint_with_another_lr_does_not_overwrite_the_later_ones(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    # the branch's step 4 replaced the run's own step-00000004.pt, without a word
    from kiln._utils import sha256_file

    train(make_settings(max_steps=4, checkpoint_every=2))
    later = tmp_path / "ckpt" / "step-00000004.pt"
    before = sha256_file(later)
    earlier = str(tmp_path / "ckpt" / "step-00000002.pt")
    with pytest.raises(
        CheckpointError,
        match=r"after step 2, the one resumed \(step-00000004.pt\), and a resume with "
        r"another lr would overwrite them .* another checkpoint_dir, or move them aside",
    ):
        train(make_settings(max_steps=4, checkpoint_every=2, lr=1e-4, resume=earlier))
    branch = train(make_settings(max_steps=4, lr=1e-4, resume=earlier, checkpoint_dir=str(tmp_path / "branch")))
    assert branch.resumed_from_step == 2 and sha256_file(later) == before
    assert Checkpointer(tmp_path / "branch").load()["step"] == 4


def test_a_stop_after_resuming_an_earlier_checkpoint_writes_its_steps(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    """latest.json names step 4; resumed from step 2 and stopped after step 3, step 3 is written, not dropped."""
    train(make_settings(max_steps=4, checkpoint_every=2))

    def stop_after_three(stats: StepStats) -> None:
        if stats.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    earlier = make_settings(max_steps=6, checkpoint_every=2, resume=str(tmp_path / "ckpt" / "step-00000002.pt"))
    with pytest.raises(KeyboardInterrupt):
        train(earlier, on_step=stop_after_three)
    assert Checkpointer(tmp_path / "ckpt").load()["step"] == 3


def test_divergence_after_resuming_an_earlier_checkpoint_names_that_checkpoint(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    settings = make_settings(dataset="diabetes", optimizer="sgd", lr=20.0, epochs=5, checkpoint_every=2)
    with pytest.raises(TrainingDiverged):
        train(settings)
    ckpt = Checkpointer(tmp_path / "ckpt")
    good = ckpt.load()
    ckpt.save(8, {k: v for k, v in good.items() if k not in ("format", "step")})  # latest.json now names step 8
    with pytest.raises(TrainingDiverged, match=r'last good checkpoint is ".*step-00000002\.pt" \(step 2\)'):
        train(dataclasses.replace(settings, resume=str(tmp_path / "ckpt" / "step-00000002.pt")))


def test_a_resumed_trainer_steps_at_its_own_lr_and_warmup(
    make_settings: Callable[..., TrainSettings], make_trainer: Callable[..., Trainer]
) -> None:
    """lr and warmup_steps may change on resume: the very first resumed step runs at the new schedule's lr."""
    first = make_trainer(make_settings(optimizer="sgd", lr=0.5))
    for _ in range(4):
        first.train_step()
    resumed = make_trainer(make_settings(optimizer="sgd", lr=0.01, warmup_steps=10))
    resumed.load_state_dict(first.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 5 / 10)  # step 5 of the warm-up
    resumed.train_step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 6 / 10)


def test_the_gradient_scalers_loss_scale_survives_a_resume(
    make_settings: Callable[..., TrainSettings], make_trainer: Callable[..., Trainer]
) -> None:
    """fp16 (a GPU) runs with a gradient scaler whose loss scale it finds as it goes; a resume must not start it
    again from the default. A CPU GradScaler drives the same code path here."""

    def with_scaler() -> Any:
        accelerator = make_accelerator("cpu", "no")
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        return accelerator

    first = make_trainer(make_settings(), accelerator=with_scaler())
    for _ in range(3):
        first.train_step()
    first.accelerator.scaler.update(77.0)  # as if overflows had backed it off
    resumed = make_trainer(make_settings(), accelerator=with_scaler())
    resumed.load_state_dict(first.state_dict())
    assert resumed.accelerator.scaler.get_scale() == 77.0
    resumed.train_step()
