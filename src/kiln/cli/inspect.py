"""``kiln inspect``: an artifact's manifest as a readable table, or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from kiln._utils import human_bytes
from kiln.cli._console import console
from kiln.errors import ArtifactError


def inspect(
    path: Path = typer.Argument(..., help="A model directory (latest version), a version directory or kiln.json."),
    version: int = typer.Option(None, "--version", help="Version to show (default: latest)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show what Kiln knows about an artifact: signature, provenance, checks, benchmarks, hardware."""
    from rich.table import Table
    from rich.text import Text

    from kiln.artifact import load, versions

    artifact = load(path, version)
    data = artifact.manifest.to_dict()
    if as_json:
        console.print_json(json.dumps(data))
        return
    # NOTE: Text, not str: the manifest's text is data, not rich markup; a source path "runs/[v2]/model.pkl"
    # printed as "runs//model.pkl".
    table = Table(title=Text(f"{artifact.name} v{artifact.version}  ({artifact.path})"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")

    def add_row(name: str, value: str) -> None:
        table.add_row(Text(name), Text(value))

    add_row("task", artifact.manifest.task)
    add_row("model", f"{data['model']['file']}  {human_bytes(data['model']['size_bytes'])}")
    table.add_row("sha256", Text.assemble(data["model"]["sha256"], "  ", ("(verified)", "green")))
    add_row("created", data["created_at"])
    add_row("inputs", _tensors(data["signature"]["inputs"]))
    add_row("outputs", _tensors(data["signature"]["outputs"]))
    if artifact.manifest.preprocessing:
        add_row("preprocessing", _kv(artifact.manifest.preprocessing))
    prov = artifact.manifest.provenance
    add_row("source", _kv(prov.get("source", {})))
    if prov.get("parent"):
        add_row("parent", f"{prov['parent']['name']} v{prov['parent']['version']}")
    for transform in prov.get("transforms", []):
        steps = ", ".join(_step(s) for s in transform.get("steps", []))
        add_row("transform", f"{transform['name']}: {steps}")
    for check, figures in artifact.manifest.checks.items():
        add_row(f"check: {check}", _check(figures))
    for bench in artifact.manifest.benchmarks:
        add_row("benchmark", _bench(bench))
    hw = artifact.manifest.hardware
    if hw:
        flags = ", ".join(k for k, v in hw.get("isa", {}).items() if v)
        add_row("hardware", f"{hw.get('cpu')} ({hw.get('usable_cores')} cores; {flags}); gpu={hw.get('gpu')}")
    if artifact.manifest.eval_data:
        add_row("held-out data", _kv(artifact.manifest.eval_data))
    add_row("versions", ", ".join(str(v) for v in versions(artifact.path.parent)))
    problems = _problems(artifact)
    for problem in problems:
        table.add_row(Text("problem", style="bold red"), Text(problem, style="red"))
    console.print(table)
    if problems:  # the sha256 matched, but the artifact is not what its manifest says: no tool would run it right
        raise ArtifactError(f'"{artifact.path}": {problems[0]}', path=str(artifact.path))


def _problems(artifact: Any) -> list[str]:
    """Where the manifest does not describe the version: a signature other than the graph's, a file it names that
    is missing. Each was shown as it stood, under "(verified)" (which vouches for the model file's bytes only)."""
    from kiln.artifact import MANIFEST_FILE
    from kiln.data import HELDOUT_FILE
    from kiln.export import check_structure, signature_of

    problems = []
    graph = signature_of(check_structure(artifact.model_path))
    if graph != artifact.manifest.signature:

        def show(signature: Any) -> str:
            return "; ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in (*signature.inputs, *signature.outputs))

        problems.append(
            f"the manifest's inputs and outputs ({show(artifact.manifest.signature)}) are not the graph's "
            f"({show(graph)}); restore its {MANIFEST_FILE} or export the model again"
        )
    held_out = artifact.manifest.eval_data
    named = {
        "tokenizer": artifact.manifest.preprocessing.get("tokenizer"),
        "held-out data": held_out.get("file", HELDOUT_FILE) if held_out.get("kind") in ("tabular", "text") else None,
    }
    for what, relative in named.items():
        if relative and not (artifact.assets_dir / relative).is_file():
            problems.append(
                f'the {what} file "{artifact.assets_dir / relative}" its {MANIFEST_FILE} names is missing; restore it '
                "or export the model again"
            )
    return problems


def _tensors(specs: list[dict[str, Any]]) -> str:
    return "\n".join(f"{s['name']}: {s['datatype']} {s['shape']}" for s in specs)


def _kv(data: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", {}))


def _step(step: dict[str, Any]) -> str:
    facts = step.get("facts", {})
    fusions = facts.get("fusions")
    detail = ", ".join(f"{k}x{v}" for k, v in fusions.items()) if fusions else _kv(step.get("settings", {}))
    return f"{step['pass']}({detail})"


def _check(figures: dict[str, Any]) -> str:
    if "outputs" in figures:
        worst = max((o["max_abs_error"] for o in figures["outputs"].values()), default=0.0)
        return f"passed={figures.get('passed')} max|diff|={worst:.2e} atol={figures.get('atol')}"
    return ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items() if k != "against"
    )


def _bench(bench: dict[str, Any]) -> str:
    parts = [f"{bench.get('speedup', 0):.2f}x vs parent"] if "speedup" in bench else []
    for bs, figures in bench.get("speed", {}).items():
        parts.append(f"batch {bs}: {figures['rows_per_s']:.1f} rows/s")
    return "; ".join(parts)
