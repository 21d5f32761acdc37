"""Data parallel on one machine: ``nproc`` workers under torchrun (gloo on CPU, NCCL on GPU via Accelerate).

The parent resolves the settings once and writes them to a JSON file; ``torchrun`` starts ``nproc`` copies of
``python -m kiln.train.worker SPEC.json``, each of which calls :func:`kiln.train.train` as one rank. Every
rank sees the same global batch and takes its rows ``rank::nproc``; with the loss divided by the global row
count and DDP averaging the gradients, a step is the same step one process would take on the whole batch.
Rank 0 alone writes checkpoints, tracks, exports, and leaves a result file the parent turns into the
:class:`TrainResult`. It also writes its steps to its stderr as ``kiln-step {json}`` lines, which the parent reads
back from torchrun's relay of that stream and hands to ``on_step`` (the CLI's progress bar) instead of printing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kiln import artifact as artifacts
from kiln import errors
from kiln.config import ExportSettings, settings_dict
from kiln.errors import KilnError
from kiln.train.settings import TrainSettings

if TYPE_CHECKING:
    from kiln.train.loop import StepStats

_WORKER_LINE = re.compile(r"\[[A-Za-z_]+\d+\]:")  # torchrun's prefix of a worker's line: "[default0]:"
STEP_LINE = "kiln-step "  # rank 0's progress: one step's figures as JSON after this, a line each


def is_worker() -> bool:
    """True inside a torchrun worker (torchrun sets ``LOCAL_RANK``), where ``train`` must not launch again."""
    return "LOCAL_RANK" in os.environ


def launch(
    settings: TrainSettings,
    export_settings: ExportSettings | None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``settings`` on ``settings.nproc`` local workers and return rank 0's result record; ``on_step`` gets
    the figures of rank 0's steps (a :class:`~kiln.train.loop.StepStats` as a dict) as they come.

    Raises:
        KilnError: the error a worker stopped on (bad data, a refused resume ...), as its own class; or, when a
            worker crashed otherwise, a KilnError after torchrun's report (the traceback is in the output above).
    """
    with tempfile.TemporaryDirectory(prefix="kiln-train-ddp-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "train": settings_dict(settings),
                    "export": settings_dict(export_settings or ExportSettings()),
                    "result": str(result),
                }
            ),
            encoding="utf-8",
        )
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={settings.nproc}",
            # the workers' output goes through files that torchrun copies to its own, each line prefixed with the
            # worker's name: so the launcher's own lines can be told apart (below)
            f"--log-dir={Path(tmp) / 'logs'}",
            "--tee=3",
            "-m",
            "kiln.train.worker",
            str(spec),
        ]
        with subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            # NOTE: one call into libc, looked up before the fork: nothing that takes a lock another thread may hold
            preexec_fn=_terminate_with_parent(),  # noqa: PLW1509
        ) as process:
            assert process.stderr is not None
            try:
                launcher = _relay_worker_lines(process.stderr, on_step)
            except BaseException:
                _stop(process)
                raise
        if process.returncode != 0 or not result.is_file():
            worker_error = _worker_error(Path(tmp))
            if worker_error is not None:
                # a mistake a rank reported (bad data, a resume that changes a setting ...): that one line, not
                # torchrun's traceback of its failed child
                raise worker_error
            sys.stderr.writelines(launcher)
            raise KilnError(
                f"data-parallel training on {settings.nproc} processes failed (torchrun exit code "
                f"{process.returncode}); the workers' errors are printed above",
                exit_code=process.returncode,
            )
        record: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    return record


def _terminate_with_parent() -> Callable[[], None] | None:
    """For torchrun's process, to run before it starts: SIGTERM it when this process dies, even by SIGKILL (Linux).

    torchrun then stops its workers, which checkpoint at the end of their step as on any SIGTERM. Without it a
    killed ``kiln train --nproc`` left torchrun and its workers training on, writing into the checkpoint directory
    a resumed run would use.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, pr_set_pdeathsig = ctypes.CDLL(None, use_errno=True).prctl, 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop torchrun as SIGTERM does (it stops its workers; SIGKILL would orphan them), then kill it if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _relay_worker_lines(stream: IO[str], on_step: Callable[[dict[str, Any]], None] | None) -> list[str]:
    """Copy the workers' lines of torchrun's stderr to ours as they come, handing rank 0's step lines to
    ``on_step`` instead; return torchrun's own lines."""
    launcher: list[str] = []
    for line in stream:
        worker = _WORKER_LINE.match(line)
        if worker:
            text = line[worker.end() :]
            if text.startswith(STEP_LINE):
                try:
                    figures = json.loads(text[len(STEP_LINE) :])
                except ValueError:  # a line cut or mixed with other output: progress is not worth a failed run
                    continue
                if on_step is not None:
                    on_step(figures)
                continue
            sys.stderr.write(line)
            sys.stderr.flush()
        else:
            launcher.append(line)
    return launcher


def error_path(result_file: Path, rank: str) -> Path:
    """Where a worker leaves the Kiln error it stopped on (beside the result file)."""
    return result_file.with_name(f"error-rank-{rank}.json")


def write_error(path: Path, exc: errors.KilnError) -> None:
    record = {"type": type(exc).__name__, "message": exc.message, "details": exc.details}
    path.write_text(json.dumps(record, default=str), encoding="utf-8")


def _worker_error(folder: Path) -> errors.KilnError | None:
    """The error the lowest rank that stopped on a Kiln error reported, as the same class (``None``: none did)."""
    found = sorted(folder.glob("error-rank-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not found:
        return None
    record = json.loads(found[0].read_text(encoding="utf-8"))
    kind = getattr(errors, str(record["type"]), None)
    if not (isinstance(kind, type) and issubclass(kind, errors.KilnError)):
        kind = errors.KilnError
    error: errors.KilnError = kind(str(record["message"]), **record["details"])
    return error


def write_result(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, default=str), encoding="utf-8")


def load_artifact(record: dict[str, Any]) -> artifacts.Artifact | None:
    return artifacts.load(record["artifact"]) if record.get("artifact") else None


def leave_process_group(*, finished: bool) -> None:
    """Tear the process group down (through Accelerate's state, which set it up) before the interpreter does.

    Left to interpreter exit, gloo's threads can be destroyed while still joinable, and the process aborts
    ("terminate called without an active exception", exit -6) after a run that succeeded: seen in the
    two-process `kiln train` test, and in a test whose ranks left without it. After a finished run the ranks
    first meet at a barrier, so none leaves while another is still in its last collective.
    """
    import torch.distributed as dist
    from accelerate.state import PartialState

    if not (dist.is_available() and dist.is_initialized()):
        return  # never set up: PartialState() here would start a rendezvous
    state = PartialState()
    if finished:
        state.wait_for_everyone()
    state.destroy_process_group()


def step_reporter(min_interval_s: float = 0.1) -> Callable[[StepStats], None]:
    """Rank 0's ``on_step``: a ``kiln-step`` line on stderr for the parent, at most every ``min_interval_s`` (and
    for the last step), so a fast run does not flood torchrun's relay."""
    last = -math.inf

    def report(stats: StepStats) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= min_interval_s or stats.step >= stats.total_steps:
            last = now
            sys.stderr.write(STEP_LINE + json.dumps(dataclasses.asdict(stats)) + "\n")
            sys.stderr.flush()

    return report
