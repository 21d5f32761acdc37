"""One error hierarchy for Kiln.

Every error carries its data in fields (the model name, the expected and the received value) as well as a
message that gives the value, the rule and the fix. Transports (CLI, HTTP, gRPC) map these types to exit codes
and status codes in one table each; nothing here knows about them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class KilnError(Exception):
    """Base of every error Kiln raises on purpose.

    Attributes:
        message: the full human-readable message (value, rule, fix).
        details: structured data about the failure, safe to serialise as JSON.
    """

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        return self.message


class ConfigError(KilnError):
    """A setting has a value outside its rule (unknown key, wrong type, out of range)."""


class InvalidInput(KilnError):
    """User-supplied data (a file, a tensor, a request) does not meet the rule it must meet."""


class ModelNotFound(KilnError):
    """A model, a version or a file that should hold one does not exist."""


class UnknownFormat(InvalidInput):
    """A file or object is not a model format Kiln can read."""


class ArtifactError(KilnError):
    """An artifact or repository on disk is malformed."""


class IntegrityError(ArtifactError):
    """A model file's sha256 does not match the one its manifest recorded."""


class ExportError(KilnError):
    """Converting a model to ONNX failed."""


class UnsupportedOpError(ExportError):
    """A model uses an operator (or opset) the target runtime cannot run."""


class ParityError(ExportError):
    """An exported model's outputs differ from its source's beyond tolerance."""


class CalibrationError(InvalidInput):
    """Calibration data does not fit the model it should calibrate."""


class AccuracyBudgetError(KilnError):
    """No optimized variant met the accuracy budget (or was faster than its parent)."""


class PayloadTooLarge(InvalidInput):
    """A request body is larger than the server accepts."""


class RequestTimeout(InvalidInput):
    """A client stopped sending its request part-way (the body stalled past the server's body timeout)."""


class ClientClosed(KilnError):
    """The client closed its connection before its request was complete; there is nobody to answer."""


class CheckpointError(KilnError):
    """A training checkpoint is missing, unreadable, corrupt, or was written by a different run."""


class NonFiniteLoss(KilnError):
    """The loss became NaN or infinite; the optimiser was not stepped with it."""


class TrainingDiverged(NonFiniteLoss):
    """Training stopped on a NaN/inf loss; the last good checkpoint was kept."""


class Overloaded(KilnError):
    """The system is at capacity (or draining); retry later. ``details["retry_after_s"]`` says when."""


class Unauthorized(KilnError):
    """A request lacks a valid API key."""


class Forbidden(KilnError):
    """A request is not allowed at all here (e.g. admin endpoints that are disabled)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``' (did you mean "x"?)'`` for the closest choice, or ``''`` when none is close (``value`` itself is
    no suggestion: a model that exists but is not loaded is not a typo)."""
    close = difflib.get_close_matches(value, [c for c in choices if c != value], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
