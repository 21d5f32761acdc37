"""``make demo`` end to end: ``kiln quickstart`` from a clean directory, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import artifact as artifacts


@pytest.mark.e2e
@pytest.mark.slow
def test_quickstart_runs_both_roads_and_writes_repo_and_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "quickstart", "--fast"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    repo = tmp_path / "kiln-repo"
    assert sorted(artifacts.list_models(repo)) == ["digits", "digits-cnn", "digits-student", "minilm"]
    student = artifacts.load(repo / "digits-student", 1)
    assert student.manifest.settings["train"]["teacher"].endswith("digits-cnn")
    minilm = artifacts.load(repo / "minilm", 1)
    assert minilm.manifest.checks["parity"]["passed"] is True
    for name in ("minilm", "digits"):
        latest = artifacts.load(repo / name)  # verifies sha256 of whatever the search wrote
        if latest.version > 1:  # a chosen variant: within budget, with its parent recorded
            assert latest.manifest.provenance["parent"]["version"] == 1
            if name == "minilm":
                assert latest.manifest.checks["fidelity"]["mean_cosine"] >= 0.99

    index = (tmp_path / "kiln-report" / "index.html").read_text()
    assert "minilm/index.html" in index and "digits/index.html" in index
    for name in ("minilm", "digits", "digits-cnn", "digits-student"):
        bench = json.loads((tmp_path / "kiln-report" / name / "bench.json").read_text())
        assert bench["rows"]
    assert "Kiln quickstart" in result.stdout and "next: kiln inspect" in result.stdout
    assert "kiln serve: ready in" in result.stdout and "(exit code 0)" in result.stdout
    load = json.loads((tmp_path / "kiln-report" / "serve" / "load.json").read_text())
    assert [step["errors"] for step in load["reports"][0]["steps"]] == [{}, {}]
    assert "Number of histogram bins" not in result.stdout  # ORT's calibration chatter stays out
