"""Kiln: take a model from training to fast, measured production serving.

The verbs are imported lazily, so ``import kiln`` stays fast and has no side effects::

    import kiln
    art = kiln.export(model, out="kiln-repo", name="digits", example_inputs=x)
    result = kiln.optimize(art)
    report = kiln.bench([art, result.chosen])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "export": ("kiln.export", "export"),
    "optimize": ("kiln.optimize", "optimize"),
    "bench": ("kiln.bench", "bench"),
    "load": ("kiln.artifact", "load"),
    "Artifact": ("kiln.artifact", "Artifact"),
    "KilnError": ("kiln.errors", "KilnError"),
}

__all__ = ["Artifact", "KilnError", "__version__", "bench", "export", "load", "optimize"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
