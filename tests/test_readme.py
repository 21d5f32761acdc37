"""The README's Python example runs as written (in a temp directory), and the package API it uses exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text
    assert "make test" in text


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert (tmp_path / "kiln-repo" / "digits" / "1" / "kiln.json").is_file()
    assert namespace["report"] is not None


def test_top_level_verbs_survive_importing_the_stage_packages() -> None:
    import kiln
    import kiln.export
    import kiln.optimize

    assert kiln.export_model is kiln.export.export
    assert kiln.optimize_model is kiln.optimize.optimize
    from kiln.serve import ServerProcess  # noqa: F401 - binds kiln.serve, the package, onto kiln

    # kiln.serve was the function until then, a module after: "'module' object is not callable"
    assert kiln.serve_models is kiln.serve.serve and callable(kiln.serve_models)
