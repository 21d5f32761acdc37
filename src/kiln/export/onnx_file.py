"""An existing ``.onnx`` file imported as a version: checked, shape-inferred, proven to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ExportError
from kiln.export.checks import check_structure, signature_of
from kiln.types import Feeds, Signature


def synthetic_feeds(signature: Signature, rows: int, seed: int = 0) -> Feeds:
    """Random feeds of the signature's dtypes, with every dynamic axis set to ``rows`` (ids stay small)."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in signature.inputs:
        shape = tuple(rows if d == -1 else d for d in spec.shape)
        dtype = spec.numpy_dtype
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[spec.name] = np.full(shape, "text", dtype=object)
    return feeds


def inspect_file(path: Path) -> tuple[Any, Signature]:
    model = check_structure(path)
    return model, signature_of(model)


def uses_external_data(path: Path) -> bool:
    """Whether the ONNX file at ``path`` keeps any tensor's data in files beside it (weights over 2 GB, or saved
    with ``save_as_external_data``)."""
    import onnx
    from onnx.external_data_helper import uses_external_data as external

    graphs, found = [onnx.load(str(path), load_external_data=False).graph], False
    while graphs and not found:
        graph = graphs.pop()
        found = any(external(t) for t in graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                found = found or (attribute.HasField("t") and external(attribute.t))
                graphs.extend([*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs])
    return found


def save_inline(model: Any, target: Path, *, source: Path) -> Path:
    """``model`` (external data already loaded) saved as one file at ``target``: an artifact's model is one file.

    Raises:
        ExportError: the model is too large for one file (protobuf's 2 GB limit).
    """
    import onnx

    size = model.ByteSize()
    if size >= 2**31:
        raise ExportError(
            f'"{source}" keeps {size / 2**30:.1f} GB of weights in external data files; a Kiln artifact holds its '
            "model in one file, which protobuf limits to 2 GB: export a smaller model (or quantize it first)",
            path=str(source),
        )
    onnx.save(model, str(target))
    return target
