"""Data parallel on one machine: ``nproc`` workers under torchrun (gloo on CPU, NCCL on GPU via Accelerate).

The parent resolves the settings once and writes them to a JSON file; ``torchrun`` starts ``nproc`` copies of
``python -m kiln.train.worker SPEC.json``, each of which calls :func:`kiln.train.train` as one rank. Every
rank sees the same global batch and takes its rows ``rank::nproc``; with the loss divided by the global row
count and DDP averaging the gradients, a step is the same step one process would take on the whole batch.
Rank 0 alone writes checkpoints, tracks, exports, and leaves a result file the parent turns into the
:class:`TrainResult`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kiln import artifact as artifacts
from kiln.config import ExportSettings, settings_dict
from kiln.errors import KilnError
from kiln.train.settings import TrainSettings


def is_worker() -> bool:
    """True inside a torchrun worker (torchrun sets ``LOCAL_RANK``), where ``train`` must not launch again."""
    return "LOCAL_RANK" in os.environ


def launch(settings: TrainSettings, export_settings: ExportSettings | None) -> dict[str, Any]:
    """Run ``settings`` on ``settings.nproc`` local workers and return rank 0's result record.

    Raises:
        KilnError: a worker failed (its one-line error or traceback is in the output above).
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
            "-m",
            "kiln.train.worker",
            str(spec),
        ]
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not result.is_file():
            raise KilnError(
                f"data-parallel training on {settings.nproc} processes failed (torchrun exit code "
                f"{done.returncode}); the workers' errors are printed above",
                exit_code=done.returncode,
            )
        record: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    return record


def write_result(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, default=str), encoding="utf-8")


def load_artifact(record: dict[str, Any]) -> artifacts.Artifact | None:
    return artifacts.load(record["artifact"]) if record.get("artifact") else None
