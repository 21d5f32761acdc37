"""An existing ``.onnx`` file imported as a version: checked, shape-inferred, proven to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
