"""Small helpers shared by every stage: hashing, atomic writes, statistics, versions."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HASH_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# NOTE: os.umask can only be read by setting it, which races with threads creating files; so it is read that way
# once, at import, and where Linux shows it (/proc/self/status) it is read there at each write instead.
_IMPORT_UMASK = _umask_by_setting()


def _modes() -> tuple[int, int]:
    """(directory, file) modes a plain mkdir and open would give now: tempfile makes owner-only ones (0700/0600),
    and what Kiln publishes must be readable by a server running as another user, as the umask allows."""
    mask = _IMPORT_UMASK
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii", errors="replace")
        mask = int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return 0o777 & ~mask, 0o666 & ~mask


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp directory next to ``final``; on success fsync it and rename it to ``final``.

    The rename is atomic on POSIX, so a reader sees either no ``final`` or a complete one. If the body raises,
    the temp directory is removed and ``final`` is untouched. ``final`` must not exist (versions are immutable).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, _modes()[0])
        os.rename(tmp, final)  # NOTE: fails if final exists and is non-empty: we never overwrite a version.
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so a reader never sees a partial one (write temp, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so a reader never sees a partial one (write temp, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), _modes()[1])
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the given distributions (missing ones are left out)."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def write_result(path: Path, payload: dict[str, Any], packages: Sequence[str]) -> Path:
    """Write a bench script's result as JSON (atomically), with the versions of ``packages`` and the machine."""
    record = payload | {"versions": package_versions(*packages), "machine": platform.platform()}
    atomic_write_text(Path(path), json.dumps(record, indent=2, default=str) + "\n")
    return Path(path)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def import_factory(spec: str, example: str) -> Any:
    """The callable named by ``package.module:factory``, imported as ``python -m`` would: the working directory
    first on the import path (a console script leaves it off, so ``mypkg/`` beside the user was not found).

    Raises:
        InvalidInput: ``spec`` is not of that form, the module cannot be imported, or it has no such attribute.
    """
    from kiln.errors import InvalidInput

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f'model "{spec}" is not of the form package.module:factory; e.g. "{example}"', model=spec)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as exc:
        raise InvalidInput(
            f'module "{module_name}" cannot be imported ({exc}); run from the directory that holds it, or add that '
            "directory to PYTHONPATH"
        ) from exc
    except AttributeError as exc:
        raise InvalidInput(f'module "{module_name}" has no attribute "{attr}"; check the factory name') from exc
