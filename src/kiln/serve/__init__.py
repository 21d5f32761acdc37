"""``kiln serve``: a KServe V2 server (HTTP and gRPC) with SLO-aware dynamic batching over a model repository.

Example:
    >>> from kiln.serve import serve
    >>> serve("kiln-repo", http_port=8000, grpc_port=8001)  # doctest: +SKIP
"""

from __future__ import annotations

from kiln.config import ServeSettings
from kiln.serve.batcher import Batcher, BatchPolicy
from kiln.serve.costmodel import BatchCostModel
from kiln.serve.dataplane import DataPlane
from kiln.serve.process import ServerProcess, free_port, free_ports
from kiln.serve.protocol import InferRequest, InferResponse, RequestedOutput
from kiln.serve.repository import ModelRepository
from kiln.serve.server import serve, serve_async

__all__ = [
    "BatchCostModel",
    "BatchPolicy",
    "Batcher",
    "DataPlane",
    "InferRequest",
    "InferResponse",
    "ModelRepository",
    "RequestedOutput",
    "ServeSettings",
    "ServerProcess",
    "free_port",
    "free_ports",
    "serve",
    "serve_async",
]
