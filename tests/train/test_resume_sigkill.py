"""The crash test: ``kiln train`` killed with SIGKILL mid-epoch, resumed, ends bitwise equal to an unbroken run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kiln.train import Checkpointer

CONFIG = """
[train]
dataset = "digits"
model = "kiln_train_test_models:slow_digits_mlp"
epochs = 3
batch_size = 32
grad_accum_steps = 2
optimizer = "adamw"
lr = 3e-3
schedule = "cosine"
warmup_steps = 5
checkpoint_every = 5
track = false
export = false
"""
TOTAL_STEPS = 3 * 22  # 1347 rows / 32 = 43 micro-batches per epoch -> 22 steps of 2 (the last one short)
KILL_AFTER_STEP = 25  # epoch 2, a few steps in


def kiln_train(config: Path, checkpoint_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # the two runs share 2 cores; one thread each keeps them from fighting
    }
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "train", str(config), "--checkpoint-dir", str(checkpoint_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def latest_step(checkpoint_dir: Path) -> int:
    try:
        return int(json.loads((checkpoint_dir / "latest.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    unbroken_dir, broken_dir = tmp_path / "unbroken", tmp_path / "broken"

    unbroken = kiln_train(config, unbroken_dir)
    victim = kiln_train(config, broken_dir)
    deadline = time.monotonic() + 120
    while latest_step(broken_dir) < KILL_AFTER_STEP:
        assert victim.poll() is None, f"the run ended before it could be killed:\n{victim.communicate()[1]}"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)  # reaps it and closes its pipes
    assert victim.returncode == -signal.SIGKILL

    killed_at = Checkpointer(broken_dir).load()
    assert KILL_AFTER_STEP <= killed_at["step"] < TOTAL_STEPS
    assert killed_at["sampler"]["epoch"] == 1 and killed_at["sampler"]["position"] > 0  # mid-epoch

    resumed = kiln_train(config, broken_dir, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed at {killed_at['step']}" in out
    out, err = unbroken.communicate(timeout=300)
    assert unbroken.returncode == 0, err

    a, b = Checkpointer(unbroken_dir).load(), Checkpointer(broken_dir).load()
    assert a["step"] == b["step"] == TOTAL_STEPS
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    for index, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer state {index}.{name}"
    assert a["rng"]["torch"].equal(b["rng"]["torch"])


def test_a_run_stopped_by_sigterm_checkpoints_and_exits_non_zero(tmp_path: Path) -> None:
    # typer handed the interrupt back as a return value, which was dropped: exit 0, so `kiln train && kiln optimize`
    # and job schedulers took an unfinished run for a finished one
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    run = kiln_train(config, tmp_path / "ck")
    deadline = time.monotonic() + 120
    while latest_step(tmp_path / "ck") < 5:
        assert run.poll() is None, f"the run ended before it could be stopped:\n{run.communicate()[1]}"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted" in err and "checkpoint written" in err, err
    assert 5 <= latest_step(tmp_path / "ck") < TOTAL_STEPS
