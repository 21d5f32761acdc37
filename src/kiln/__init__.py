"""Kiln: take a model from training to fast, measured production serving.

The verbs are imported lazily, so ``import kiln`` stays fast and has no side effects::

    import kiln
    art = kiln.export_model(clf, out="kiln-repo", name="digits", example_inputs=x, eval_data=(x, y))
    result = kiln.optimize_model(art)
    report = kiln.bench_models([art, result.chosen])
    trained = kiln.train_model(kiln.TrainSettings(dataset="digits", epochs=5))  # a TrainResult with its artifact
    kiln.serve_models("kiln-repo", http_port=8000)  # blocks until SIGTERM

NOTE: the top-level names are ``export_model`` etc., not ``export``: ``kiln.export`` is the stage package, and
Python binds a subpackage onto its parent when it is imported, which would shadow a function of the same name.
``kiln.serve`` was such a name: it was the function until anything imported ``kiln.serve``, then the module.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "export_model": ("kiln.export", "export"),
    "optimize_model": ("kiln.optimize", "optimize"),
    "bench_models": ("kiln.bench", "bench"),
    "train_model": ("kiln.train", "train"),
    "TrainSettings": ("kiln.train", "TrainSettings"),
    "serve_models": ("kiln.serve", "serve"),
    "load": ("kiln.artifact", "load"),
    "Artifact": ("kiln.artifact", "Artifact"),
    "KilnError": ("kiln.errors", "KilnError"),
}

__all__ = [
    "Artifact",
    "KilnError",
    "TrainSettings",
    "__version__",
    "bench_models",
    "export_model",
    "load",
    "optimize_model",
    "serve_models",
    "train_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
