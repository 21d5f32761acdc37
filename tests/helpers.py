"""Helpers the test modules share (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def kiln(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m kiln ARGS`` as a user runs it: exit code, stdout and stderr (200 columns: rich does not wrap)."""
    return subprocess.run(
        [sys.executable, "-m", "kiln", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@contextmanager
def serving(command: list[str], url: str) -> Iterator[None]:
    """Run the server ``command``; yield once ``GET {url}/v2/health/ready`` answers 200; SIGTERM it afterwards
    (and kill it if it has not exited 15 s later)."""
    from kiln.bench.loadtarget import wait_ready

    process = subprocess.Popen(command)
    try:
        wait_ready(url, timeout_s=60.0, poll_s=0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def assert_top_classes(got: Any, scores: Any, count: int, labels: list[str]) -> None:
    """``got`` holds Triton's classification strings ``"<value>:<index>[:<label>]"`` of each row's ``count``
    highest ``scores`` (bytes from the binary and gRPC forms, str from JSON)."""
    assert got.shape == (len(scores), count)
    for row, expected_row in zip(got.tolist(), scores, strict=True):
        parsed = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
        assert [int(p[1]) for p in parsed] == np.argsort(-expected_row, kind="stable")[:count].tolist()
        np.testing.assert_allclose([float(p[0]) for p in parsed], np.sort(expected_row)[::-1][:count], atol=2e-6)
        assert [p[2:] for p in parsed] == [[labels[int(p[1])]] if labels else [] for p in parsed]


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    """``rows`` (the header first) as a UTF-8 CSV at ``path``."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path
