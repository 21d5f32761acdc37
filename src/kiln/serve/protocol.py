"""The transport-free shapes of a KServe V2 inference request and response.

HTTP (JSON or the binary tensor extension) and gRPC (typed contents or ``raw_*_contents``) both decode into
``InferRequest`` and encode from ``InferResponse``; the data plane sees nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as raw bytes (binary extension; ``None``: it did not
    say, and the request's ``binary_data_output`` decides).

    ``classification`` > 0 asks for the output's top classes instead of the tensor (Triton's classification
    extension): BYTES ``"<value>:<index>[:<label>]"``, shape ``[rows, classification]``.
    """

    name: str
    binary: bool | None = None
    classification: int = 0


@dataclass
class InferRequest:
    """One decoded request: named numpy inputs (BYTES as object arrays of ``bytes``) and what to return.

    ``timeout_s`` is the client's deadline relative to arrival (``None``: the server's own limits only).
    """

    inputs: dict[str, Array]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output_default: bool = False
    timeout_s: float | None = None
    datatypes: dict[str, str] = field(default_factory=dict)  # the V2 datatype each input was sent as


@dataclass
class InferResponse:
    """Named numpy outputs of one request, in the order they are to be encoded."""

    model_name: str
    model_version: str
    outputs: dict[str, Array]
    binary: dict[str, bool] = field(default_factory=dict)
    id: str = ""
