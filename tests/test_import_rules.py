"""The import rules of ARCHITECTURE.md, checked on the source with ``ast`` (nothing under src/kiln is imported).

- The core (errors, types, config, _utils) imports nothing else from kiln; data, artifact and fidelity import
  only the core.
- A stage imports the core, data, artifact, fidelity, runtime (any module), its own package, and another stage
  only through that stage's package (``from kiln.export import x``, never ``from kiln.export.torch import x``).
- Nothing but the CLI (and ``kiln.__main__``, which runs it) imports ``kiln.cli``.
- Heavy optional libraries are imported inside the function that needs them, never at module level.
- Only ``kiln/serve/http.py`` and ``kiln/serve/grpc.py`` import a web or RPC framework.
- ``import kiln`` pulls in no heavy library, starts no thread and sets up no logging.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

CORE = frozenset({"kiln.errors", "kiln.types", "kiln.config", "kiln._utils"})
# Modules shared by the stages that, like the core, sit below every stage. kiln.fidelity is not in
# ARCHITECTURE.md's drawing; it holds the accuracy metrics optimize and bench share, so it sits here.
SHARED = frozenset({"kiln.data", "kiln.artifact", "kiln.fidelity"})
# quickstart is the demo road: it calls the stages through their public APIs, like a user would.
STAGES = frozenset({"runtime", "export", "optimize", "train", "bench", "serve", "cluster", "quickstart"})
HEAVY_OPTIONAL = frozenset({"ray", "mlflow", "openvino", "tensorrt", "peft", "opacus"})
WEB_FRAMEWORKS = frozenset({"fastapi", "starlette", "uvicorn", "grpc"})
WEB_MODULES = frozenset({"kiln.serve.http", "kiln.serve.grpc"})
NOT_ON_IMPORT_KILN = (
    "torch",
    "onnxruntime",
    "onnx",
    "onnxscript",
    "transformers",
    "tokenizers",
    "sentence_transformers",
    "sklearn",
    "numpy",
    "matplotlib",
    "typer",
    "rich",
    *sorted(HEAVY_OPTIONAL),
    *sorted(WEB_FRAMEWORKS),
)


@dataclass(frozen=True)
class ImportSite:
    file: Path
    line: int
    importer: str  # dotted name of the importing module
    target: str  # dotted name of the imported module
    module_level: bool  # runs when the importer is imported (not inside a function, not under TYPE_CHECKING)

    def where(self, root: Path) -> str:
        return f"{self.file.relative_to(root)}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, file: Path, importer: str, is_package: bool, known: set[str]) -> None:
        self.file, self.importer, self.known = file, importer, known
        self.package = importer if is_package else importer.rpartition(".")[0]
        self.sites: list[ImportSite] = []
        self._deferred = 0  # > 0 inside a function body or an `if TYPE_CHECKING:` block

    def _add(self, node: ast.stmt, target: str) -> None:
        self.sites.append(ImportSite(self.file, node.lineno, self.importer, target, self._deferred == 0))

    def _visit_deferred(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_deferred

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._deferred += 1
        for child in node.body:
            self.visit(child)
        self._deferred -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        for alias in node.names:
            # `from kiln.export import torch` imports the module kiln.export.torch when that module exists.
            candidate = f"{module}.{alias.name}"
            self._add(node, candidate if candidate in self.known else module)


def import_sites(src: Path) -> list[ImportSite]:
    files = sorted((src / "kiln").rglob("*.py"))
    known = {module_name(f, src) for f in files}
    sites: list[ImportSite] = []
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        collector = _Collector(file, module_name(file, src), file.name == "__init__.py", known)
        collector.visit(tree)
        sites.extend(collector.sites)
    return sites


def layer(module: str) -> str:
    """core | shared | stage:<name> | cli | root | unknown"""
    parts = module.split(".")
    if module == "kiln":
        return "root"
    if module in CORE:
        return "core"
    if module in SHARED:
        return "shared"
    if parts[1] in STAGES:
        return f"stage:{parts[1]}"
    if parts[1] == "cli" or module == "kiln.__main__":  # `python -m kiln` is the CLI's other door
        return "cli"
    return "unknown"


def kiln_import_allowed(importer: str, target: str) -> bool:
    source, dest = layer(importer), layer(target)
    if source == "cli":
        return True
    if source in ("core", "root"):
        return dest == "core"
    if source == "shared":
        return dest == "core"
    # a stage
    own = source.removeprefix("stage:")
    if dest in ("core", "shared", "stage:runtime", source):
        return True
    if dest == "root":
        return True  # `import kiln` / `from kiln import __version__`: the root imports nothing at import time
    other = dest.removeprefix("stage:")
    return dest.startswith("stage:") and other != own and target == f"kiln.{other}"


def violations(src: Path) -> list[str]:
    found = [
        f"{file.relative_to(src)}:1: module {name} is in no layer of ARCHITECTURE.md; classify it in this test"
        for file in sorted((src / "kiln").rglob("*.py"))
        if layer(name := module_name(file, src)) == "unknown"
    ]
    for site in import_sites(src):
        top = site.target.split(".")[0]
        where = site.where(src)
        if top == "kiln" and not kiln_import_allowed(site.importer, site.target):
            found.append(f"{where}: {site.importer} ({layer(site.importer)}) may not import {site.target}")
        if top in HEAVY_OPTIONAL and site.module_level:
            found.append(f"{where}: {site.importer} imports {site.target} at module level; import it in the function")
        if top in WEB_FRAMEWORKS and site.importer not in WEB_MODULES:
            found.append(f"{where}: {site.importer} imports {site.target}; only {sorted(WEB_MODULES)} may")
    return sorted(set(found))


# --- the rules, on the real source -------------------------------------------------------------------------------


def test_source_tree_is_where_the_test_expects() -> None:
    assert (SRC / "kiln" / "__init__.py").is_file()
    assert {"kiln.errors", "kiln.artifact", "kiln.runtime.onnx"} <= {s.importer for s in import_sites(SRC)}


def test_import_rules_hold() -> None:
    found = violations(SRC)
    assert not found, "import rules of ARCHITECTURE.md broken:\n" + "\n".join(found)


# --- the checker itself, on small trees that break each rule -----------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"kiln/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"kiln/errors.py": "from kiln.artifact import load\n"}, "kiln/errors.py:1: kiln.errors (core) may not import"),
        ({"kiln/config.py": "\n\nimport kiln.data\n"}, "kiln/config.py:3: kiln.config (core) may not import kiln.data"),
        ({"kiln/data.py": "from kiln.runtime import OrtEngine\n"}, "may not import kiln.runtime"),
        ({"kiln/artifact.py": "from kiln.export import export\n"}, "may not import kiln.export"),
        (
            {"kiln/optimize/search.py": "def f():\n    from kiln.export.torch import export_torch\n"},
            "kiln/optimize/search.py:2: kiln.optimize.search (stage:optimize) may not import kiln.export.torch",
        ),
        (
            {"kiln/optimize/search.py": "from kiln.export import torch\n", "kiln/export/torch.py": ""},
            "may not import kiln.export.torch",
        ),
        ({"kiln/serve/batcher.py": "from kiln.cli import main\n"}, "may not import kiln.cli"),
        ({"kiln/bench/report.py": "import mlflow\n"}, "kiln/bench/report.py:1: kiln.bench.report imports mlflow at"),
        ({"kiln/train/lora.py": "try:\n    from peft import LoraConfig\nexcept ImportError:\n    pass\n"}, "peft"),
        ({"kiln/serve/dataplane.py": "def f():\n    import fastapi\n"}, "imports fastapi; only"),
        ({"kiln/cluster/ray.py": "from starlette.requests import Request\n"}, "imports starlette.requests"),
        ({"kiln/helpers.py": ""}, "module kiln.helpers is in no layer"),
        ({"kiln/serve/queue.py": "from .. import artifact\nfrom ..export.torch import x\n"}, "kiln/serve/queue.py:2"),
    ],
)
def test_checker_reports_file_line_and_rule(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    found = violations(write_tree(tmp_path, files))
    assert any(expected in v for v in found), found


def test_checker_accepts_what_the_rules_allow(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        {
            "kiln/errors.py": "import difflib\n",
            "kiln/config.py": "from kiln.errors import ConfigError\nfrom kiln import _utils\n",
            "kiln/_utils.py": "",
            "kiln/artifact.py": "from kiln._utils import sha256_file\nfrom kiln.types import Signature\n",
            "kiln/runtime/__init__.py": "",
            "kiln/runtime/onnx.py": "from kiln.runtime.hardware import probe\nfrom kiln.data import english_corpus\n",
            "kiln/export/__init__.py": "",
            "kiln/export/torch.py": "",
            "kiln/optimize/search.py": (
                "from typing import TYPE_CHECKING\n"
                "from kiln import artifact\n"
                "from kiln.export import export\n"
                "from kiln.runtime.onnx import OrtEngine\n"
                "from . import passes\n"
                "if TYPE_CHECKING:\n"
                "    import ray\n"
                "def track():\n"
                "    import mlflow\n"
            ),
            "kiln/optimize/passes.py": "",
            "kiln/serve/http.py": "import fastapi\nimport uvicorn\nfrom starlette.responses import Response\n",
            "kiln/serve/grpc.py": "import grpc\n",
            "kiln/cli/main.py": "from kiln.export.torch import x\nfrom kiln.cli import other\n",
        },
    )
    assert violations(tree) == []


# --- import kiln stays light -------------------------------------------------------------------------------------

_PROBE = """
import json, logging, sys, threading
before = set(sys.modules)
import kiln
print(json.dumps({
    "new": sorted(set(sys.modules) - before),
    "threads": threading.active_count(),
    "root_handlers": len(logging.getLogger().handlers),
    "version": kiln.__version__,
}))
"""


def test_import_kiln_is_light_and_side_effect_free() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(result.stdout)
    heavy = sorted({m.split(".")[0] for m in report["new"]} & set(NOT_ON_IMPORT_KILN))
    assert not heavy, f"`import kiln` imports {heavy}; import them lazily where they are used"
    assert report["threads"] == 1, "`import kiln` started a thread"
    assert report["root_handlers"] == 0, "`import kiln` configured logging"
    assert report["version"]
