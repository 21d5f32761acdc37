"""Crash-safe checkpoints: atomic files, a sha256-checked pointer to the latest, and exact RNG capture.

Layout of a checkpoint directory::

    step-00000120.pt          # model, optimizer, scheduler, sampler position, RNG states, resolved settings
    step-00000160.pt
    step-00000160.rank-1.rng  # with --nproc: the RNG states of each other rank at that step
    latest.json               # {"step": 160, "file": "step-00000160.pt", "sha256": "..."}

Each ``.pt`` file is written to a temp file, fsynced and renamed, then ``latest.json`` is replaced the same way;
a crash at any instant leaves ``latest.json`` pointing at a complete file. Older files beyond ``keep`` are
removed only after the new pointer is in place. Each rank but 0 writes its own ``.rng`` files (no collective:
a gather of them through the process group deadlocked gloo's teardown) and prunes its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln._utils import atomic_write_bytes, atomic_write_text, sha256_file
from kiln.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "kiln.train-checkpoint/1"
POINTER = "latest.json"


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, shuffles, user code), as plain saveable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).copy()), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _rank_rng_name(step: int, rank: int) -> str:
    return f"step-{step:08d}.rank-{rank}.rng"


class Checkpointer:
    """Writes and reads the checkpoints of one run directory.

    Example:
        >>> ckpt = Checkpointer(tmp_path / "ckpt", keep=2)  # doctest: +SKIP
        >>> ckpt.save(10, {"model": model.state_dict()})  # doctest: +SKIP
        >>> ckpt.load_latest()["step"]  # doctest: +SKIP
        10
    """

    def __init__(self, directory: Path, *, keep: int = 2) -> None:
        self.directory = directory
        self.keep = keep

    def save(self, step: int, state: dict[str, Any]) -> SavedCheckpoint:
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "step": step, **state}, buffer)
        data = buffer.getvalue()
        path = self.directory / f"step-{step:08d}.pt"
        atomic_write_bytes(path, data)
        pointer = {"step": step, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        atomic_write_text(self.directory / POINTER, json.dumps(pointer, indent=2) + "\n")
        self._prune("step-*.pt", keep_name=path.name)
        logger.info("checkpoint step %d -> %s (%d bytes)", step, path, len(data))
        return SavedCheckpoint(step, path)

    def save_rank_rng(self, step: int, rank: int) -> SavedCheckpoint:
        """Rank ``rank``'s RNG states at ``step``, beside rank 0's checkpoint of that step (the ranks draw apart)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "step": step, "rank": rank, "rng": capture_rng()}, buffer)
        path = self.directory / _rank_rng_name(step, rank)
        atomic_write_bytes(path, buffer.getvalue())
        self._prune(f"step-*.rank-{rank}.rng", keep_name=path.name)
        return SavedCheckpoint(step, path)

    @staticmethod
    def load_rank_rng(checkpoint: Path, step: int, rank: int) -> dict[str, Any] | None:
        """The RNG states rank ``rank`` saved beside ``checkpoint`` at ``step``; ``None`` if it wrote none (the run
        stopped between rank 0's write and this rank's)."""
        path = checkpoint.parent / _rank_rng_name(step, rank)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise CheckpointError(
                f'"{path}" (rank {rank}\'s RNG states at step {step}) cannot be read ({type(exc).__name__}); delete '
                "it to resume with rank 0's RNG states on that rank (the run then draws other dropout masks than "
                "an unbroken one)",
                path=str(path),
            ) from exc
        return saved["rng"] if isinstance(saved, dict) and saved.get("step") == step else None

    def _prune(self, pattern: str, keep_name: str) -> None:
        """Remove the oldest files matching ``pattern`` beyond ``keep``, never ``keep_name`` (the one just written)."""
        files = sorted(self.directory.glob(pattern))
        for old in files[: max(0, len(files) - self.keep)]:
            if old.name != keep_name:
                old.unlink(missing_ok=True)

    def later_than(self, step: int) -> list[Path]:
        """The checkpoints of this directory after ``step``, oldest first."""
        found = []
        for path in sorted(self.directory.glob("step-*.pt")):
            number = path.stem.removeprefix("step-")
            if number.isdigit() and int(number) > step:
                found.append(path)
        return found

    def latest(self) -> SavedCheckpoint | None:
        """The checkpoint ``latest.json`` points at, or ``None`` when the directory holds none."""
        pointer_path = self.directory / POINTER
        if not pointer_path.is_file():
            return None
        try:
            pointer = json.loads(pointer_path.read_text(encoding="utf-8"))
            return SavedCheckpoint(int(pointer["step"]), self.directory / str(pointer["file"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f'"{pointer_path}" is not a valid checkpoint pointer ({exc}); the .pt files beside it are intact: '
                "resume from one of them with --resume-from",
                path=str(pointer_path),
            ) from exc

    def load(self, path: Path | None = None) -> dict[str, Any]:
        """Load ``path`` (default: the latest), verifying its sha256 when the pointer recorded one."""
        expected: str | None = None
        if path is None:
            found = self.latest()
            if found is None:
                raise CheckpointError(
                    f'no checkpoint in "{self.directory}" to resume from; start without --resume, or point '
                    "checkpoint_dir at the directory of the interrupted run",
                    path=str(self.directory),
                )
            path = found.path
            expected = json.loads((self.directory / POINTER).read_text(encoding="utf-8")).get("sha256")
        if not path.is_file():
            there = sorted(path.parent.glob("step-*.pt")) if path.parent.is_dir() else []
            fix = (
                f"its directory holds {', '.join(p.name for p in there)} (a run keeps its last keep_checkpoints, 2 "
                "by default): pass one of them"
                if there
                else "pass a step-*.pt file of the run's checkpoint_dir"
            )
            raise CheckpointError(f'checkpoint "{path}" does not exist; {fix}', path=str(path))
        if expected is not None and sha256_file(path) != expected:
            raise CheckpointError(
                f'checkpoint "{path}" is corrupt: its sha256 differs from the one recorded when it was written; '
                f"{self._others_hint(path)}",
                path=str(path),
            )
        try:
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f'checkpoint "{path}" cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); '
                f"{self._others_hint(path)}",
                path=str(path),
            ) from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f'"{path}" is not a Kiln training checkpoint ({FORMAT})', path=str(path))
        return state

    def _others_hint(self, bad: Path) -> str:
        others = [p for p in sorted(self.directory.glob("step-*.pt")) if p != bad]
        if others:
            return f'nothing was deleted; resume from an earlier one with --resume-from "{others[-1]}"'
        return "nothing was deleted; no other checkpoint exists, so start the run again without --resume"
