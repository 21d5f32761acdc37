"""``kiln optimize`` as users run it: a real subprocess, its exit code and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln import artifact as artifacts
from tests.helpers import kiln


@pytest.mark.parametrize(
    ("report", "message"),
    [("blocker/search.json", "is a file, not a directory"), (".", "is a directory; pass a file path")],
)
def test_a_report_path_that_cannot_be_written_is_refused_before_the_search(
    tmp_path: Path, tiny_artifact: artifacts.Artifact, report: str, message: str
) -> None:
    # the search ran (and could write a chosen version) before the report failed as an "internal error"
    (tmp_path / "blocker").write_text("a file")
    np.savez(tmp_path / "held.npz", input=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    quick = ("--recipes", "ort-extended", "--batch-sizes", "8", "--target-batch-size", "8")
    result = kiln(
        "optimize",
        tiny_artifact.path.parent,
        *quick,
        "--eval-data",
        tmp_path / "held.npz",
        "--report",
        tmp_path / report,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --report") and message in lines[0], result.stderr
    assert artifacts.versions(tiny_artifact.path.parent) == [1]
