"""``nproc = 2``: two torchrun workers (gloo on CPU) take the same steps one process takes on the whole batch."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.train import Checkpointer, TrainSettings, train
from kiln.train.distributed import leave_process_group


def test_two_processes_equal_one_on_the_same_global_batch(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    common = {"dataset": "digits", "max_steps": 6, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "cpu_threads": 1}
    seen_two: list[Any] = []
    seen_one: list[Any] = []
    two = train(make_settings(nproc=2, checkpoint_dir=str(tmp_path / "two"), **common), on_step=seen_two.append)
    one = train(make_settings(nproc=1, checkpoint_dir=str(tmp_path / "one"), **common), on_step=seen_one.append)
    # the two-process run trained in torchrun's workers; rank 0 relayed its steps (at most every 0.1 s, and the last)
    assert len(seen_one) == 6 and 1 <= len(seen_two) <= 6
    assert [s.step for s in seen_two] == sorted({s.step for s in seen_two}) and seen_two[-1].step == 6
    for relayed in seen_two:
        assert relayed.loss == pytest.approx(seen_one[relayed.step - 1].loss, rel=1e-5)
        assert relayed.total_steps == 6 and relayed.samples_per_s > 0
    assert two.steps == one.steps == 6
    assert [h["loss"] for h in two.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    a, b = Checkpointer(tmp_path / "two").load()["model"], Checkpointer(tmp_path / "one").load()["model"]
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6)
    assert two.metrics["test_accuracy"] == pytest.approx(one.metrics["test_accuracy"], abs=1 / 450)


def test_the_launcher_hands_rank_0s_step_lines_to_on_step_and_relays_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from kiln.train.distributed import STEP_LINE, _relay_worker_lines

    torchrun_stderr = io.StringIO(
        "[default0]:a warning from rank 0\n"
        f"[default0]:{STEP_LINE}" + json.dumps({"step": 3, "loss": 0.5}) + "\n"
        f"[default0]:{STEP_LINE}" + '{"step": 4, "lo\n'  # a line cut short: skipped, not a failed run
        "[default1]:a line from rank 1\n"
        "W1207 torchrun's own line\n"
    )
    seen: list[dict[str, Any]] = []
    launcher = _relay_worker_lines(torchrun_stderr, seen.append)
    assert seen == [{"step": 3, "loss": 0.5}]
    assert capsys.readouterr().err == "[default0]:a warning from rank 0\n[default1]:a line from rank 1\n"
    assert launcher == ["W1207 torchrun's own line\n"]


def test_a_two_process_run_resumed_mid_epoch_ends_where_one_run_ends(
    make_settings: Callable[..., TrainSettings], tmp_path: Path
) -> None:
    """``--resume`` under ``--nproc``: rank 0's checkpoint (step 5, mid-epoch) restores every rank. Without dropout:
    each rank's own RNG stream is not in it (the README's limits)."""
    common = {"dataset": "digits", "batch_size": 64, "nproc": 2, "cpu_threads": 1, "checkpoint_every": 0}
    train(make_settings(max_steps=10, checkpoint_dir=str(tmp_path / "one-go"), **common))
    train(make_settings(max_steps=5, checkpoint_dir=str(tmp_path / "two-goes"), **common))
    resumed = train(make_settings(max_steps=10, checkpoint_dir=str(tmp_path / "two-goes"), resume="latest", **common))
    assert resumed.resumed_from_step == 5 and resumed.steps == 10
    one_go, two_goes = Checkpointer(tmp_path / "one-go").load(), Checkpointer(tmp_path / "two-goes").load()
    assert two_goes["sampler"] == one_go["sampler"] and two_goes["sampler"]["position"] != 0
    for key, value in one_go["model"].items():
        torch.testing.assert_close(two_goes["model"][key], value, rtol=0, atol=0)


def on_workers_path(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``kiln_train_test_models`` for this process and for torchrun's workers."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))


def test_each_rank_draws_its_own_dropout_masks_and_rank_0_those_of_one_process(
    make_settings: Callable[..., TrainSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    factories_on_path: Path,
) -> None:
    """Seeded alike, the ranks drew alike: at equal shares two rows of a global batch got one dropout mask."""
    on_workers_path(monkeypatch, factories_on_path)
    monkeypatch.setenv("KILN_TEST_PROBE_DIR", str(tmp_path))
    common = {"dataset": "digits", "model": "kiln_train_test_models:probed_digits_mlp", "max_steps": 2}
    train(make_settings(nproc=2, batch_size=64, checkpoint_dir=str(tmp_path / "two"), **common))
    ranks = [(tmp_path / f"rank-{r}.txt").read_text(encoding="utf-8") for r in (0, 1)]
    train(make_settings(nproc=1, batch_size=64, checkpoint_dir=str(tmp_path / "one"), **common))
    assert ranks[0] != ranks[1]
    assert (tmp_path / "rank-0.txt").read_text(encoding="utf-8") == ranks[0]  # one process: rank 0's streams


def test_a_two_process_run_with_dropout_and_uneven_shares_resumes_bitwise(
    make_settings: Callable[..., TrainSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    factories_on_path: Path,
) -> None:
    """63-row batches (32 and 31 rows a rank) with dropout: each rank's RNG states are saved beside rank 0's
    checkpoint and restored on resume. With rank 0's on every rank, the weights parted from the unbroken run's."""
    on_workers_path(monkeypatch, factories_on_path)
    common = {
        "dataset": "digits", "model": "kiln_train_test_models:slow_digits_mlp", "batch_size": 63, "nproc": 2,
        "cpu_threads": 1, "checkpoint_every": 0,
    }  # fmt: skip
    train(make_settings(max_steps=8, checkpoint_dir=str(tmp_path / "one-go"), **common))
    train(make_settings(max_steps=4, checkpoint_dir=str(tmp_path / "two-goes"), **common))
    resumed = train(make_settings(max_steps=8, checkpoint_dir=str(tmp_path / "two-goes"), resume="latest", **common))
    assert resumed.resumed_from_step == 4 and resumed.steps == 8
    one_go, two_goes = Checkpointer(tmp_path / "one-go").load(), Checkpointer(tmp_path / "two-goes").load()
    for key, value in one_go["model"].items():
        torch.testing.assert_close(two_goes["model"][key], value, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "two-goes").glob("*.rng")) == [
        "step-00000004.rank-1.rng",
        "step-00000008.rank-1.rng",
    ]


def test_two_processes_fine_tune_text_as_one_does(
    make_settings: Callable[..., TrainSettings], topics_jsonl: Path, tmp_path: Path
) -> None:
    """Text under ``--nproc``: each rank pads its share of every token-budget batch. MiniLM's pooler, which mean
    pooling never reads, left DDP waiting for its gradient at the second step. A copy of MiniLM without dropout
    (the ranks draw other masks than one process does), so both runs compute the same function."""
    from kiln.train.text import encoder_path

    model_dir = tmp_path / "minilm-no-dropout"
    model_dir.mkdir()
    for source in encoder_path("minilm").iterdir():
        if source.name != "config.json":
            (model_dir / source.name).symlink_to(source)
    config = json.loads((encoder_path("minilm") / "config.json").read_text(encoding="utf-8"))
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    common = {
        "dataset": str(topics_jsonl), "model": str(model_dir), "max_length": 32, "max_tokens": 256, "max_steps": 3,
        "optimizer": "sgd", "lr": 0.05, "cpu_threads": 1,
    }  # fmt: skip
    two = train(make_settings(nproc=2, checkpoint_dir=str(tmp_path / "two"), **common))
    one = train(make_settings(nproc=1, checkpoint_dir=str(tmp_path / "one"), **common))
    assert two.steps == one.steps == 3
    a, b = Checkpointer(tmp_path / "two").load()["model"], Checkpointer(tmp_path / "one").load()["model"]
    from safetensors.torch import load_file

    query = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(b[f"encoder.{query}"], load_file(str(model_dir / "model.safetensors"))[query])  # trained
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-6)
    assert two.metrics["test_accuracy"] == pytest.approx(one.metrics["test_accuracy"])


def _join_as_rank(rank: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of two (gloo on localhost:``port``), on one thread."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)


def _run_two_ranks(target: Callable[[int, int, Any], None], timeout_s: float) -> list[Any]:
    """Run ``target(rank, port, results)`` as ranks 0 and 1 in spawned processes: what each put in ``results``.

    A rank that does not answer within ``timeout_s``, or dies without answering, fails the test (the processes are
    killed); both must exit 0.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=target, args=(rank, port, results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    deadline, got = time.monotonic() + timeout_s, []
    try:
        while len(got) < len(workers):
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                died = any(worker.exitcode not in (None, 0) for worker in workers)
                assert not died and time.monotonic() < deadline, (
                    f"{len(got)} of {len(workers)} ranks answered; exit codes {[w.exitcode for w in workers]}"
                )
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0, 0]
    return got


def _constant_lr_trainer(work: Any, settings: TrainSettings, **trainer_args: Any) -> Any:
    """A Trainer on ``work`` (``prepare_workload(settings)``) at ``settings.lr``, constant, on the CPU;
    ``trainer_args`` (loss_sum, collate, sizer, ...) replace its defaults."""
    from kiln.train.loop import Trainer, make_accelerator
    from kiln.train.optim import make_optimizer

    optimizer = make_optimizer(work.model, settings)
    args: dict[str, Any] = {"loss_sum": work.loss_sum, "accelerator": make_accelerator("cpu", "no")} | trainer_args
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return Trainer(work.model, optimizer, scheduler, work.sampler, work.tensors, **args)


def _adaptive_rank(rank: int, port: int, results: Any) -> None:
    """One of two data-parallel ranks (gloo): 60 steps with the goodput sizer; rank 1's own sizer never grows."""
    _join_as_rank(rank, port)
    from kiln.train.goodput import GoodputSizer
    from kiln.train.workload import prepare_workload

    settings = TrainSettings(dataset="digits", hidden_sizes=(32,), batch_size=8, track=False, export=False)
    sizer = GoodputSizer(base_batch=8, max_batch=64)
    if rank == 1:
        sizer.explore_min_efficiency = 2.0  # no bigger batch is ever worth exploring to this rank's sizer
    trainer = _constant_lr_trainer(prepare_workload(settings, None), settings, sizer=sizer, noise_every=2)
    sizes: list[int] = []
    trainer.fit(60, on_step=lambda stats: sizes.append(stats.batch_size))
    lrs = [float(group["lr"]) for group in trainer.optimizer.param_groups]
    results.put((rank, sizes, lrs))
    leave_process_group(finished=True)


def test_rank_0_decides_the_batch_size_for_every_rank() -> None:
    """Each rank measures its own throughput, so their sizers can disagree; the ranks must still step through the
    same batch sizes and lrs. Here rank 1's sizer would never grow the batch: it follows rank 0's."""
    got = {rank: (sizes, lrs) for rank, sizes, lrs in _run_two_ranks(_adaptive_rank, timeout_s=240)}
    (sizes0, lrs0), (sizes1, lrs1) = got[0], got[1]
    assert max(sizes0) > 8, "rank 0's sizer never grew the batch"
    assert sizes1 == sizes0
    assert lrs1 == pytest.approx(lrs0)


def test_kiln_train_nproc_2_grows_the_batch(make_settings: Callable[..., TrainSettings], tmp_path: Path) -> None:
    """The same through `train(nproc=2)` (torchrun): the run finishes its epochs and records why the batch grew."""
    settings = make_settings(
        dataset="digits",
        hidden_sizes=(128,),
        batch_size=8,
        epochs=5,  # the sizer reaches 64-128 rows within a few dozen steps: fewer, bigger steps per epoch
        adaptive_batch=True,
        nproc=2,
        cpu_threads=1,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    result = train(settings)
    assert result.batch_size_changes, "the batch never grew"
    assert max(int(h["batch_size"]) for h in result.history) > 8
    assert result.metrics["test_accuracy"] >= 0.9
    state = Checkpointer(tmp_path / "ckpt").load()
    assert state["sampler"]["epoch"] == 5 and state["sizer"]["changes"] == result.batch_size_changes


def _dropout_mode_rank(rank: int, port: int, results: Any) -> None:
    """One of two data-parallel ranks (gloo): 2 steps of a model with dropout, as the run builds it."""
    _join_as_rank(rank, port)
    from kiln.train.workload import prepare_workload

    settings = TrainSettings(dataset="digits", hidden_sizes=(32,), dropout=0.5, track=False, export=False)
    work = prepare_workload(settings, None)  # its shape probe leaves the model in eval mode
    dropout = next(m for m in work.model.modules() if isinstance(m, torch.nn.Dropout))
    seen: list[bool] = []
    dropout.register_forward_hook(lambda module, _inputs, _output: seen.append(module.training))
    trainer = _constant_lr_trainer(work, settings)
    trainer.fit(2)
    results.put((rank, seen))
    leave_process_group(finished=True)


def test_data_parallel_steps_run_the_model_in_training_mode() -> None:
    """Under DDP the wrapper's `training` flag was True while the module it wraps stayed in eval mode, so every
    `--nproc` run trained without dropout (and with BatchNorm's running statistics)."""
    assert sorted(_run_two_ranks(_dropout_mode_rank, timeout_s=120)) == [(0, [True, True]), (1, [True, True])]


def test_a_mistake_under_nproc_is_the_workers_error_not_torchruns_traceback(
    make_settings: Callable[..., TrainSettings], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from kiln.errors import InvalidInput

    path = tmp_path / "data.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)), encoding="utf-8")
    with pytest.raises(InvalidInput, match=r'column "lable" is not in .*\(did you mean "label"\?\)'):
        train(make_settings(dataset=str(path), target="lable", nproc=2, cpu_threads=1))
    assert "Traceback" not in capfd.readouterr().err


def _diverging_rank(rank: int, port: int, results: Any) -> None:
    """One of two data-parallel ranks (gloo) whose loss turns NaN at step 3 on rank 1 only."""
    _join_as_rank(rank, port)
    from kiln.errors import TrainingDiverged
    from kiln.train.workload import prepare_workload

    settings = TrainSettings(dataset="digits", hidden_sizes=(32,), batch_size=8, track=False, export=False)
    work = prepare_workload(settings, None)

    def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = work.loss_sum(model, batch)
        return loss * float("nan") if rank == 1 and trainer.step == 3 else loss

    trainer = _constant_lr_trainer(work, settings, loss_sum=loss_sum)
    try:
        trainer.fit(6)
        results.put((rank, "finished", trainer.step))
    except TrainingDiverged as exc:
        results.put((rank, "diverged", exc.details["step"]))
    leave_process_group(finished=True)


def test_a_nan_loss_on_one_rank_stops_every_rank_before_the_update() -> None:
    """Rank 1 alone sees a NaN loss: if it stopped alone, rank 0 would wait in the gradient all-reduce (gloo's
    timeout is 30 minutes). Both must raise TrainingDiverged at the same step, with no update applied."""
    assert sorted(_run_two_ranks(_diverging_rank, timeout_s=120)) == [(0, "diverged", 4), (1, "diverged", 4)]


def _wine_trainer() -> Any:
    """SGD on wine, 33-row batches: 133 training rows make four batches and a last one of a single row."""
    from kiln.train.workload import prepare_workload

    settings = TrainSettings(
        dataset="wine", hidden_sizes=(16,), batch_size=33, optimizer="sgd", lr=0.1, track=False, export=False
    )
    work = prepare_workload(settings, None)

    def collate(rows: Sequence[int]) -> dict[str, torch.Tensor]:  # fails on no rows, as text padding does
        if not rows:
            raise ValueError("collate got no rows")
        index = torch.as_tensor(list(rows))
        return {k: v[index] for k, v in work.tensors.items()}

    return _constant_lr_trainer(work, settings, collate=collate)


def _one_row_batch_rank(rank: int, port: int, results: Any) -> None:
    _join_as_rank(rank, port)
    trainer = _wine_trainer()
    trainer.fit(10)  # two epochs, each ending in a one-row batch
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # tensors would share memory
    results.put((rank, trainer.step, weights))
    leave_process_group(finished=True)


def test_a_batch_with_fewer_rows_than_ranks_trains_as_one_process_does() -> None:
    """A one-row batch gives rank 1 no share of it: rank 1 runs a row at zero weight, so both ranks still meet in
    the gradient all-reduce, and the result equals one process training on the same batches."""
    got = {rank: (steps, weights) for rank, steps, weights in _run_two_ranks(_one_row_batch_rank, timeout_s=120)}
    torch.set_num_threads(1)
    alone = _wine_trainer()
    alone.fit(10)
    assert got[0][0] == got[1][0] == alone.step == 10
    for key, value in alone.model.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(got[0][1][key]), value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(got[1][1][key]), value, rtol=1e-5, atol=1e-6)


def test_killing_kiln_train_stops_torchrun_and_its_workers(tmp_path: Path, factories_on_path: Path) -> None:
    """SIGKILL on ``kiln train --nproc 2`` (no handler runs): torchrun and both workers trained on, writing into the
    checkpoint directory a resume would use. torchrun now gets SIGTERM when its parent dies, and stops its workers."""
    import signal
    import subprocess
    import sys

    import psutil

    checkpoints, config = tmp_path / "ck", tmp_path / "run.toml"
    config.write_text(
        '[train]\ndataset = "digits"\nmodel = "kiln_train_test_models:slow_digits_mlp"\nepochs = 50\nbatch_size = 16\n'
        "checkpoint_every = 2\ntrack = false\nexport = false\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "kiln", "train", str(config), "--nproc", "2", "--checkpoint-dir", str(checkpoints)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories_on_path), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not (checkpoints / "latest.json").is_file():
            assert parent.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        children = psutil.Process(parent.pid).children(recursive=True)
        assert [c.cmdline()[2:4] for c in children].count(["-m", "kiln.train.worker"]) == 2, children
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=30)  # they stop at the end of a step (SIGTERM)
        assert not alive, f"still running after their parent was killed: {[p.cmdline() for p in alive]}"
    finally:
        for process in [*children, parent]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
