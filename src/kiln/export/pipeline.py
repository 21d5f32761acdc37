"""The part every exporter shares: check the ONNX file, prove parity at two shapes, write the artifact."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln import artifact as artifacts
from kiln._utils import package_versions
from kiln.config import ExportSettings, settings_dict
from kiln.data import first_misfit
from kiln.errors import ArtifactError, ExportError, InvalidInput
from kiln.export.checks import check_parity, check_structure, open_session, opsets_of, signature_of
from kiln.runtime import probe
from kiln.types import Feeds

TRACKED_PACKAGES = ("kiln", "torch", "onnx", "onnxruntime", "onnxscript", "transformers", "scikit-learn", "skl2onnx")


def check_destination(out: Path, name: str) -> None:
    """Refuse, before any work, a model name that is not one directory of the repository, or an ``out`` that is
    not a directory: the version would land outside the repository, or fail after a long export."""
    artifacts.check_model_name(name, fix="pass --name, e.g. --name digits-mlp")
    if out.exists() and not out.is_dir():
        raise InvalidInput(
            f'--out "{out}" is a file, not a model repository directory; pass a directory (it is created if missing)',
            path=str(out),
        )
    # a version directory, or a model's, took the new model inside it (an "immutable" v1 grew other/1/)
    inside = (
        "a version directory" if (out / artifacts.MANIFEST_FILE).is_file()
        else "a model directory" if (out / "config.pbtxt").is_file() or artifacts.versions(out)
        else None
    )  # fmt: skip
    if inside:
        up = out.parent if inside == "a model directory" else out.parent.parent
        raise InvalidInput(
            f'--out "{out}" is {inside}, not a model repository; pass the repository that holds it ("{up}"): '
            "models go one directory below it",
            path=str(out),
        )


def _check_same_signature(out: Path, name: str, signature: Any) -> None:
    """A new version keeps the inputs and outputs of the model's latest: a model has one config (Triton's
    config.pbtxt, kiln serve's metadata), and one whose input changed from [-1, 64] to [-1, 1, 8, 8] broke it for
    the versions before, while bench refused to compare them as "versions of one model"."""
    found = artifacts.versions(out / name)
    if not found:
        return
    try:
        latest = artifacts.load(out / name, found[-1], verify=False)
    except ArtifactError:  # a broken version: not this export's business
        return
    if latest.manifest.signature != signature:

        def show(sig: Any) -> str:
            def tensors(specs: Any) -> str:
                return ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in specs)

            return f"{tensors(sig.inputs)} -> {tensors(sig.outputs)}"

        raise InvalidInput(
            f'model "{name}" v{latest.version} takes {show(latest.manifest.signature)}, but this export takes '
            f"{show(signature)}; the versions of a model share its inputs and outputs (one config serves them): "
            "export it under another --name",
            model=name,
        )


def _check_held_out_fits(held_out: bytes, signature: Any, name: str) -> None:
    """Held-out rows are stored now and read by optimize and bench later: they must fit the model's inputs (an
    immutable version with rows of another width could never be optimized or benchmarked)."""
    import io

    import numpy as np

    with np.load(io.BytesIO(held_out), allow_pickle=False) as data:
        misfit = first_misfit(signature.inputs, {key: data[key].shape for key in data.files})
    if misfit is not None:
        spec, shape = misfit
        raise InvalidInput(
            f'held-out inputs have shape {list(shape)} but input "{spec.name}" of model "{name}" takes '
            f"{list(spec.shape)} (-1 = any size); pass held-out rows that fit the model (a --dataset of the "
            "same width)",
            input=spec.name,
            expected=list(spec.shape),
            actual=list(shape),
        )


def _run_imported(engine: Any, feeds: Feeds, path: Path) -> None:
    """Run an imported graph on random feeds of its signature: one that fails (a reshape to a fixed batch under a
    -1 batch axis, say) is the file's mistake, said in a line, not an internal error."""
    try:
        engine.run(feeds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        raise ExportError(
            f'"{path.name}" does not run at input shapes {shapes}, which its inputs declare it takes ({first}); fix '
            "the graph's input shapes (a -1 batch axis the graph does not support, say) and import it again",
            path=str(path),
        ) from exc


def finalize(
    onnx_path: Path,
    *,
    out: Path,
    name: str,
    task: str,
    reference: Callable[[Feeds], Feeds] | None,
    sample_feeds: Sequence[Feeds],
    source: dict[str, Any],
    settings: ExportSettings,
    preprocessing: dict[str, Any] | None = None,
    postprocessing: dict[str, Any] | None = None,
    eval_data: dict[str, Any] | None = None,
    assets: dict[str, Path | bytes] | None = None,
) -> artifacts.Artifact:
    """Check ``onnx_path`` and write it as the next version of ``name`` under ``out``.

    ``sample_feeds`` should hold at least two feeds of different shapes along each dynamic axis: running both
    proves the axes were kept, not frozen at the example's size. Nothing is written if any check fails.
    """
    check_destination(out, name)
    model = check_structure(onnx_path)
    signature = signature_of(model)
    _check_same_signature(out, name, signature)
    held_out = (assets or {}).get("heldout.npz")
    if isinstance(held_out, bytes) and (eval_data or {}).get("kind") == "tabular":
        _check_held_out_fits(held_out, signature, name)
    engine = open_session(onnx_path, model)
    shapes = {tuple((k, v.shape) for k, v in feeds.items()): feeds for feeds in sample_feeds}  # a fixed batch: one
    parity: dict[str, Any] = {}
    if reference is not None:
        for feeds in sample_feeds:
            shape_key = "x".join(str(v.shape[0]) for v in list(feeds.values())[:1])
            for output, figures in check_parity(
                reference, engine, feeds, atol=settings.parity_atol, rtol=settings.parity_rtol
            ).items():
                entry = parity.setdefault(output, {"max_abs_error": 0.0, "max_rel_error": 0.0, "shapes": []})
                entry["max_abs_error"] = max(entry["max_abs_error"], figures["max_abs_error"])
                entry["max_rel_error"] = max(entry["max_rel_error"], figures["max_rel_error"])
                entry["shapes"].append({k: list(v.shape) for k, v in feeds.items()} | {"batch": shape_key})
    else:
        for feeds in shapes.values():  # no source to compare with: at least prove it runs at each shape
            _run_imported(engine, feeds, onnx_path)
    manifest = artifacts.Manifest(
        name=name,
        signature=signature,
        task=task,
        preprocessing=preprocessing or {},
        postprocessing=postprocessing or {},
        provenance={
            "source": source,
            "parent": None,
            "transforms": [],
            "opsets": opsets_of(model),
            "versions": package_versions(*TRACKED_PACKAGES),
        },
        checks={
            "parity": {"passed": True, "atol": settings.parity_atol, "rtol": settings.parity_rtol, "outputs": parity}
            if reference is not None
            else {  # it was recorded as passed=False, for a file nothing had been compared with
                "skipped": "an imported ONNX file has no source to compare with; it ran at input shapes "
                + "; ".join(", ".join(f"{k} {list(shape)}" for k, shape in key) for key in shapes)
            }
        },
        hardware=probe(),
        settings={"export": settings_dict(settings)},
        eval_data=eval_data or {},
    )
    try:
        return artifacts.write(out, manifest, onnx_path, assets=assets)
    except OSError as exc:
        raise ArtifactError(
            f'cannot write model "{name}" into repository "{out}" ({exc.strerror or exc}); pass a writable --out '
            "directory; nothing was written",
            path=str(out),
        ) from exc
