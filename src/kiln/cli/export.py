"""``kiln export``: a model file, directory or factory into an ONNX artifact."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kiln._utils import human_bytes
from kiln.cli._console import console, parse_ints
from kiln.errors import ConfigError, InvalidInput

BUNDLED_ALIASES = ("minilm", "all-minilm-l6-v2")


def export(
    source: str = typer.Argument(
        None,
        help="An .onnx file, a Hugging Face directory, a scikit-learn pickle/joblib file, or 'minilm' for the "
        "bundled all-MiniLM-L6-v2. Leave out with --model.",
    ),
    out: Path = typer.Option(Path("kiln-repo"), "--out", "-o", help="Model repository to write the version into."),
    name: str = typer.Option(None, "--name", "-n", help="Model name in the repository (default: from the source)."),
    model: str = typer.Option(None, "--model", help="A PyTorch model factory, package.module:function."),
    weights: Path = typer.Option(None, "--weights", help="safetensors weights to load into the --model."),
    example_shape: str = typer.Option(
        None, "--example-shape", help="Shape of a float32 example batch for --model, e.g. 4,1,8,8."
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="A bundled dataset (digits, breast_cancer, wine, iris, diabetes): example rows and the held-out set "
        "stored with the artifact for the accuracy guard.",
    ),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickle (it runs code)."),
    exporter: str = typer.Option(None, "--exporter", help="PyTorch exporter: dynamo (default) or torchscript."),
    opset: int = typer.Option(None, "--opset", help="ONNX opset (default: 18 with the dynamo exporter, 17 otherwise)."),
    parity_atol: float = typer.Option(None, "--parity-atol", help="Absolute tolerance of the parity gate."),
    parity_rtol: float = typer.Option(None, "--parity-rtol", help="Relative tolerance of the parity gate."),
    config: Path = typer.Option(None, "--config", help="TOML config file (\\[export] table)."),
) -> None:
    """Export a model to ONNX with dynamic axes, check parity with its source, and write a new version."""
    from kiln.config import ExportSettings, resolve
    from kiln.export import export as export_model

    settings = resolve(
        ExportSettings,
        {"exporter": exporter, "opset": opset, "parity_atol": parity_atol, "parity_rtol": parity_rtol},
        config_file=config,
    )
    example: Any = None
    eval_data: tuple[Any, Any] | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    if dataset:
        from kiln.data import bundled_dataset

        data = bundled_dataset(dataset)
        example, eval_data, task = data.x_test, (data.x_test, data.y_test), data.task
        labels = data.target_names or None
    if model and source is not None:  # the file was dropped without a word, and a random-weight model exported
        raise ConfigError(
            f'pass a SOURCE ("{source}") or --model {model}, not both; --weights loads weights into the --model'
        )
    if not model and (weights is not None or example_shape is not None):
        raise ConfigError("--weights and --example-shape apply to --model package.module:factory only; leave them out")
    if model:
        import torch

        from kiln.export.torch import load_factory

        module = load_factory(model, weights)
        if example is None:
            shape = parse_ints(example_shape, "--example-shape")
            if shape is None:
                raise InvalidInput("--model needs example inputs: pass --example-shape 4,64 or --dataset NAME")
            example = torch.randn(*shape)
        else:
            example = torch.from_numpy(example)
            eval_data = (torch.from_numpy(eval_data[0]), eval_data[1]) if eval_data else None
        artifact = export_model(
            module,
            out=out,
            name=name or model.rpartition(":")[2],
            example_inputs=example,
            eval_data=eval_data,
            task=task,
            labels=labels,
            settings=settings,
            factory=model,
            weights=weights,
        )
    else:
        if source is None:
            raise InvalidInput("nothing to export: pass a SOURCE path, 'minilm', or --model package.module:factory")
        path: Path | str = source
        if source.lower() in BUNDLED_ALIASES:
            from kiln.export import bundled_minilm_path

            path, name = bundled_minilm_path(), name or "minilm"
        with console.status(f"exporting {source} ..."):
            artifact = export_model(
                path,
                out=out,
                name=name,
                example_inputs=example,
                eval_data=eval_data,
                task=task,
                labels=labels,
                settings=settings,
                trust_pickle=trust_pickle,
            )
    parity = artifact.manifest.checks.get("parity", {})
    worst = max((o["max_abs_error"] for o in parity.get("outputs", {}).values()), default=0.0)
    checked = "parity skipped: no source to compare with" if "skipped" in parity else f"parity max |diff| {worst:.2e}"
    console.print(
        f"[green]exported[/] {escape(f'{artifact.name} v{artifact.version} -> {artifact.path}')} "
        f"({human_bytes(artifact.manifest.model['size_bytes'])}, {checked})"
    )
    console.print(f"next: kiln optimize {shlex.quote(str(artifact.path.parent))}", markup=False)
