"""``kiln export``: any model into ONNX, the unified IR, with dynamic axes kept and a parity gate.

Example:
    >>> from sklearn.linear_model import LogisticRegression
    >>> from kiln.data import bundled_dataset
    >>> data = bundled_dataset("iris")
    >>> clf = LogisticRegression(max_iter=500).fit(data.x_train, data.y_train)
    >>> art = export(clf, out=tmp_path, name="iris", example_inputs=data.x_test,
    ...              eval_data=(data.x_test, data.y_test))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifact import Artifact
from kiln.config import ExportSettings, check_settings_object, resolve
from kiln.data import TEXT_EVAL_OFFSET, heldout_asset
from kiln.errors import ConfigError, InvalidInput, ModelNotFound, UnknownFormat
from kiln.export import hf, onnx_file, sklearn
from kiln.export import torch as torch_export
from kiln.export.checks import check_parity, check_structure, signature_of
from kiln.export.hf import bundled_minilm_path, load_hf_encoder
from kiln.export.pipeline import check_destination, finalize
from kiln.runtime import Engine, TorchEngine

__all__ = [
    "ExportSettings",
    "bundled_minilm_path",
    "check_parity",
    "check_structure",
    "export",
    "load_hf_encoder",
    "signature_of",
    "source_engine",
]

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
Array = np.ndarray[Any, Any]


def export(
    model: Any,
    *,
    out: Path | str,
    name: str | None = None,
    example_inputs: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    task: str | None = None,
    eval_data: tuple[Any, Any] | None = None,
    labels: Sequence[str] | None = None,
    settings: ExportSettings | None = None,
    trust_pickle: bool = False,
    factory: str | None = None,
    weights: Path | None = None,
) -> Artifact:
    """Export ``model`` to ONNX and write it as the next version of ``name`` in repository ``out``.

    ``model`` is an ``nn.Module`` (needs ``example_inputs``), a scikit-learn estimator or pipeline (needs
    ``example_inputs``: a 2-D feature array), a path to a local Hugging Face directory (exported as a sentence
    embedder with mean pooling + normalisation), a path to an ``.onnx`` file, or a pickle/joblib path (only
    with ``trust_pickle``). ``eval_data=(x, y)`` stores a held-out set with the artifact for the accuracy guard.

    Raises:
        ParityError: the ONNX outputs differ from the source's beyond tolerance (nothing is written).
        UnsupportedOpError: ONNX Runtime has no kernel for an operator of the graph.
        UnknownFormat / ModelNotFound / InvalidInput: the source cannot be read.
    """
    settings = check_settings_object(settings, ExportSettings) if settings is not None else resolve(ExportSettings, {})
    out = Path(out)
    if name is not None:  # before any work: a MiniLM export takes a while to fail at the write otherwise
        check_destination(out, name)
    _check_eval_data(eval_data)
    if isinstance(model, str | Path):
        return _export_path(
            Path(model),
            out=out,
            name=name,
            example_inputs=example_inputs,
            task=task,
            eval_data=eval_data,
            labels=labels,
            settings=settings,
            trust_pickle=trust_pickle,
        )
    if sklearn.is_sklearn(model):
        return _export_sklearn(
            model,
            out=out,
            name=name or type(model).__name__.lower(),
            example_inputs=example_inputs,
            eval_data=eval_data,
            labels=labels,
            settings=settings,
            source_extra={},
        )
    if _is_torch_module(model):
        return _export_torch(
            model,
            out=out,
            name=name or type(model).__name__.lower(),
            example_inputs=example_inputs,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            task=task or "generic",
            eval_data=eval_data,
            labels=labels,
            settings=settings,
            factory=factory,
            weights=weights,
        )
    raise UnknownFormat(
        f"cannot export an object of type {type(model).__module__}.{type(model).__name__}; Kiln exports torch "
        "nn.Module, scikit-learn estimators/pipelines, Hugging Face directories and .onnx files",
        type=type(model).__name__,
    )


def _is_torch_module(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def _export_path(
    path: Path,
    *,
    out: Path,
    name: str | None,
    example_inputs: Any,
    task: str | None,
    eval_data: tuple[Any, Any] | None,
    labels: Sequence[str] | None,
    settings: ExportSettings,
    trust_pickle: bool,
) -> Artifact:
    if not path.exists():
        raise ModelNotFound(f'"{path}" does not exist; pass a model file or directory', path=str(path))
    if path.is_dir():
        if hf.is_hf_directory(path):
            # resolved: `kiln export .` would otherwise name the model "" and write versions into the repository root
            return _export_hf(path, out=out, name=name or path.resolve().name.lower(), settings=settings)
        raise UnknownFormat(
            f'directory "{path}" is not a Hugging Face model (no config.json); pass an .onnx file, a pickle or a '
            "Hugging Face directory",
            path=str(path),
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _export_onnx(
            path, out=out, name=name or path.stem, task=task, eval_data=eval_data, labels=labels, settings=settings
        )
    if suffix in _PICKLE_SUFFIXES:
        model = sklearn.load_pickle(path, trust_pickle=trust_pickle)
        if not sklearn.is_sklearn(model):
            raise UnknownFormat(
                f'"{path}" holds a {type(model).__name__}, not a scikit-learn estimator', path=str(path)
            )
        return _export_sklearn(
            model,
            out=out,
            name=name or path.stem,
            example_inputs=example_inputs,
            eval_data=eval_data,
            labels=labels,
            settings=settings,
            source_extra={"path": str(path.resolve())},
        )
    raise UnknownFormat(
        f'"{path}" has suffix "{suffix or "(none)"}", which is not a model format Kiln reads; use .onnx, '
        f"{', '.join(_PICKLE_SUFFIXES)} (with --trust-pickle), a Hugging Face directory, or --model pkg.mod:factory",
        path=str(path),
        suffix=suffix,
    )


def _check_eval_data(eval_data: Any) -> None:
    """``eval_data`` is ``(x, y)``: an array alone was unpacked as its rows 0 and 1, and a third item ignored."""
    if eval_data is not None and (not isinstance(eval_data, tuple | list) or len(eval_data) != 2):
        what = f"a {type(eval_data).__name__}" + (
            f" of {len(eval_data)}" if isinstance(eval_data, tuple | list) else ""
        )
        raise InvalidInput(
            f"eval_data is {what}; pass a pair (x, y): x the held-out rows, y their labels (or None)",
        )


def _eval_entry(eval_data: tuple[Any, Any] | None, input_name: str) -> tuple[dict[str, Any], dict[str, Path | bytes]]:
    if eval_data is None:
        return {}, {}
    x, y = eval_data
    feeds = {input_name: np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)}
    rows = feeds[input_name]
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():  # optimize and bench scored NaN against the parent
        raise InvalidInput(
            "eval_data holds NaN or infinite values; hold out real, finite rows (drop or fill those), as "
            "kiln optimize --eval-data requires"
        )
    y_arr = None if y is None else np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
    if y_arr is not None and len(y_arr) != len(feeds[input_name]):
        raise InvalidInput(
            f"eval_data has {len(feeds[input_name])} rows of inputs but {len(y_arr)} labels; they must match"
        )
    return {"kind": "tabular", "file": "heldout.npz", "rows": len(feeds[input_name])}, {
        "heldout.npz": heldout_asset(feeds, y_arr)
    }


def _export_sklearn(
    model: Any,
    *,
    out: Path,
    name: str,
    example_inputs: Any,
    eval_data: tuple[Any, Any] | None,
    labels: Sequence[str] | None,
    settings: ExportSettings,
    source_extra: dict[str, Any],
) -> Artifact:
    if example_inputs is None and eval_data is not None:  # the held-out rows show the input width as well
        example_inputs = eval_data[0]
    if example_inputs is None:
        raise InvalidInput(
            "a scikit-learn model needs example rows to fix its input width (and held-out rows to guard its accuracy "
            "later): `kiln export ... --dataset NAME`, or example_inputs= / eval_data=(x, y) from Python"
        )
    import sklearn as sk

    _check_opset_known(settings)
    settings = dataclasses.replace(settings, exporter="skl2onnx", opset=settings.opset_for("skl2onnx"))  # as run
    x = _feature_rows(example_inputs)
    task = sklearn.task_of(model)
    labels = sklearn.class_names(model, labels, None if eval_data is None else eval_data[1])
    with torch_export.temp_workdir() as tmp:
        path, outputs = sklearn.convert(model, x, settings.opset_for("skl2onnx"), Path(tmp))
        rows = x[: settings.parity_samples]
        eval_entry, assets = _eval_entry(
            (np.asarray(eval_data[0], dtype=np.float32), eval_data[1]) if eval_data else None, sklearn.INPUT_NAME
        )
        return finalize(
            path,
            out=out,
            name=name,
            task=task,
            reference=sklearn.reference(model, outputs),
            sample_feeds=[{sklearn.INPUT_NAME: rows}, {sklearn.INPUT_NAME: x[: max(1, len(rows) // 2 + 1)]}],
            source={"framework": "scikit-learn", "version": sk.__version__, "class": type(model).__name__}
            | source_extra,
            settings=settings,
            # "classes": what the label output gives, so held-out labels can be checked against it (optimize)
            postprocessing=({"labels": list(labels)} if labels else {}) | _classes_entry(model),
            eval_data=eval_entry,
            assets=assets,
        )


def _check_opset_known(settings: ExportSettings) -> None:
    """For skl2onnx: an opset newer than the installed onnx knows failed inside the converter, whose advice was about
    something else ("check that every step ... has a registered converter"). The torch exporters check their own."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if settings.opset is not None and settings.opset > newest:
        raise ConfigError(
            f"opset {settings.opset} is newer than the installed onnx {onnx.__version__} knows (up to {newest}); "
            f"pass --opset {newest} or lower, or leave it out for the exporter's default",
            setting="opset",
        )


def _feature_rows(example_inputs: Any) -> np.ndarray[Any, Any]:
    """A scikit-learn model's example rows as float32: numbers, finite, at least one row (each of these was a bare
    ValueError from NumPy or scikit-learn)."""
    try:
        x = np.asarray(example_inputs, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"example_inputs are not numbers ({exc}); pass numeric feature rows (encode categories as numbers)"
        ) from exc
    if x.ndim >= 1 and len(x) == 0:
        raise InvalidInput("example_inputs hold no rows; pass at least one feature row")
    if not np.isfinite(x).all():
        raise InvalidInput("example_inputs hold NaN or infinite values; pass real, finite feature rows")
    return x


def _classes_entry(model: Any) -> dict[str, Any]:
    values = sklearn.class_values(model)
    return {"classes": values} if values is not None else {}


def _export_torch(
    module: Any,
    *,
    out: Path,
    name: str,
    example_inputs: Any,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    task: str,
    eval_data: tuple[Any, Any] | None,
    labels: Sequence[str] | None,
    settings: ExportSettings,
    factory: str | None,
    weights: Path | None,
) -> Artifact:
    import torch

    if example_inputs is None:
        raise InvalidInput("a PyTorch model needs example_inputs (a batch of real inputs) to be exported")
    settings = dataclasses.replace(settings, opset=settings.opset_for(settings.exporter))  # recorded as written
    module = module.eval()
    feeds = torch_export.match_module_dtype(module, torch_export.as_feeds(example_inputs, input_names))
    flat = {name: list(value.shape) for name, value in feeds.items() if len(value.shape) < 2}
    if flat and dynamic_axes is None:  # its one axis became the batch axis: the parity run grew the features
        name, shape = next(iter(flat.items()))
        raise InvalidInput(
            f'example input "{name}" has shape {shape}, no batch axis: axis 0 is the batch (rows); pass a batch, '
            f"e.g. x[None] for one row of shape {shape[1:] or shape}, or give dynamic_axes yourself",
            input=name,
        )
    n_out = torch_export.count_outputs(module, feeds)
    outputs = list(output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]))
    if len(outputs) != n_out:
        raise InvalidInput(f"the model returns {n_out} outputs but {len(outputs)} output names were given ({outputs})")
    axes = dynamic_axes or {n: {0: "batch"} for n in [*feeds, *outputs]}
    with torch_export.temp_workdir() as tmp:
        path = torch_export.export_module(
            module,
            feeds,
            outputs,
            axes,
            opset=settings.opset_for(settings.exporter),
            exporter=settings.exporter,
            workdir=Path(tmp),
        )
        eval_entry, assets = _eval_entry(eval_data, next(iter(feeds)))
        source: dict[str, Any] = {
            "framework": "pytorch",
            "version": torch.__version__,
            "class": type(module).__name__,
            "exporter": settings.exporter,
        }
        if factory:
            source |= {"factory": factory, "weights": str(weights.resolve()) if weights else None}
        return finalize(
            path,
            out=out,
            name=name,
            task=task,
            reference=torch_export.torch_reference(module, outputs),
            sample_feeds=[feeds, torch_export.grow_batch(feeds)],
            source=source,
            settings=settings,
            postprocessing={"labels": list(labels)} if labels else {},
            eval_data=eval_entry,
            assets=assets,
        )


def _export_hf(path: Path, *, out: Path, name: str, settings: ExportSettings) -> Artifact:
    import transformers

    settings = dataclasses.replace(settings, exporter="torchscript", opset=settings.opset_for("torchscript"))
    max_length = hf.max_length_of(path)
    module = hf.build_module(path)
    samples = hf.sample_feeds(path, max_length)
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        hf.OUTPUT_NAME: {0: "batch"},
    }
    with torch_export.temp_workdir() as tmp:
        onnx_path = torch_export.export_module(
            module,
            samples[0],
            [hf.OUTPUT_NAME],
            axes,
            opset=settings.opset_for("torchscript"),
            exporter="torchscript",
            workdir=Path(tmp),
        )
        return finalize(
            onnx_path,
            out=out,
            name=name,
            task="embedding",
            reference=torch_export.torch_reference(module, [hf.OUTPUT_NAME]),
            sample_feeds=samples,
            source={
                "framework": "transformers",
                "version": transformers.__version__,
                "path": str(path.resolve()),
                "architecture": type(module.encoder).__name__,
                "exporter": "torchscript",
                # the transformer fuser needs these to recognise the attention subgraphs
                "num_attention_heads": int(module.encoder.config.num_attention_heads),
                "hidden_size": int(module.encoder.config.hidden_size),
            },
            settings=settings,
            preprocessing={
                "kind": "text",
                "tokenizer": "tokenizer/tokenizer.json",
                "max_length": max_length,
                "pooling": "mean",
                "normalize": True,
            },
            eval_data={"kind": "text_corpus", "source": "pydoc_data.topics", "offset": TEXT_EVAL_OFFSET},
            assets=hf.tokenizer_assets(path),
        )


def _export_onnx(
    path: Path,
    *,
    out: Path,
    name: str,
    task: str | None,
    eval_data: tuple[Any, Any] | None,
    labels: Sequence[str] | None,
    settings: ExportSettings,
) -> Artifact:
    import onnx

    model, signature = onnx_file.inspect_file(path)
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if settings.opset is not None and settings.opset != opset:
        raise ConfigError(
            f'opset {settings.opset} was asked for, but "{path}" is an ONNX file of opset {opset}, imported as it is; '
            "leave --opset out (or convert the file first, with onnx.version_converter)",
            setting="opset",
        )
    settings = dataclasses.replace(settings, exporter="none (an ONNX file, imported)", opset=opset)  # as it is
    eval_entry, assets = _eval_entry(eval_data, signature.inputs[0].name) if eval_data else ({}, {})
    with torch_export.temp_workdir() as tmp:
        model_file = path
        if onnx_file.uses_external_data(path):  # its weights, in files beside it, were left behind: the version
            model_file = onnx_file.save_inline(model, Path(tmp) / "model.onnx", source=path)  # could not load
        return finalize(
            model_file,
            out=out,
            name=name,
            task=task or "generic",
            reference=None,
            sample_feeds=[onnx_file.synthetic_feeds(signature, 1), onnx_file.synthetic_feeds(signature, 3)],
            source={
                "framework": "onnx",
                "version": onnx.__version__,
                "path": str(path.resolve()),
                "producer": f"{model.producer_name} {model.producer_version}".strip(),
            },
            settings=settings,
            postprocessing={"labels": list(labels)} if labels else {},
            eval_data=eval_entry,
            assets=assets,
        )


def source_engine(artifact: Artifact) -> Engine | None:
    """Rebuild the PyTorch model an artifact was exported from, for side-by-side benchmarks.

    Works for Hugging Face directories and ``--model package.module:factory`` sources; ``None`` otherwise
    (scikit-learn, ONNX files, or a module passed as a Python object).
    """
    source = artifact.manifest.provenance.get("source", {})
    inputs, outputs = list(artifact.manifest.signature.inputs), list(artifact.manifest.signature.outputs)
    if source.get("framework") == "transformers" and Path(source.get("path", "")).is_dir():
        return TorchEngine(hf.build_module(Path(source["path"])), inputs, outputs, name="pytorch-eager")
    if source.get("framework") == "pytorch" and source.get("factory"):
        weights = Path(source["weights"]) if source.get("weights") else None
        return TorchEngine(torch_export.load_factory(source["factory"], weights), inputs, outputs, name="pytorch-eager")
    return None
