"""The transport-free core of ``kiln serve``: every V2 operation, for HTTP and gRPC alike.

It holds the model repository, the batchers and the metrics; the transports decode a request, call one method
here and encode what it returns. Errors are ``KilnError`` subclasses; each transport maps them to its status
codes in one table. Nothing here knows about HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

import kiln
from kiln import artifact as artifacts
from kiln.config import ServeSettings, settings_dict
from kiln.errors import Forbidden, InvalidInput, KilnError, Overloaded, Unauthorized
from kiln.serve.batcher import BatchPolicy
from kiln.serve.metrics import ServerMetrics
from kiln.serve.protocol import InferRequest, InferResponse
from kiln.serve.repository import LoadedVersion, ModelRepository
from kiln.types import TensorSpec

logger = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "statistics",
    "model_repository",
    "schedule_policy",
)


class DataPlane:
    """KServe V2 operations over a model repository.

    Example:
        >>> plane = DataPlane(Path("kiln-repo"), ServeSettings())  # doctest: +SKIP
        >>> await plane.start()  # doctest: +SKIP
        >>> response = await plane.infer("minilm", None, request)  # doctest: +SKIP
    """

    def __init__(self, root: Path, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.policy = BatchPolicy(
            max_batch_size=settings.max_batch_size if settings.batching else 1,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            p99_target_s=settings.p99_target_ms / 1000 if settings.p99_target_ms else None,
            max_queue_rows=settings.max_queue_rows,
            batching=settings.batching,
        )
        self.repository = ModelRepository(
            root,
            self.policy,
            self.metrics,
            latest_versions=settings.version_policy_latest,
            instances=settings.instances,
            sessions=settings.sessions,
            intra_op_threads=settings.intra_op_threads,
            warmup=settings.warmup,
        )
        self._accepting = False
        self._starting = True
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured models (all models in the repository when none are named), warm, then ready."""
        names = list(self.settings.models) or artifacts.list_models(self.repository.root)
        if not names:
            raise KilnError(
                f'repository "{self.repository.root}" holds no models; add one with `kiln export ... --out '
                f"{self.repository.root}`"
            )
        for name in names:
            await self.repository.load(name)
        self._accepting = True
        self._starting = False

    async def drain(self) -> None:
        """Stop accepting requests, then wait for every accepted one to be answered."""
        self._accepting = False
        self._starting = False
        while self._inflight:
            self._idle.clear()
            await self._idle.wait()
        await self.repository.drain()

    async def close(self) -> None:
        await self.drain()
        await self.repository.close()

    # -- health and metadata --------------------------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._accepting and bool(self.repository.served())

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": kiln.__version__, "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.repository.get(name, version)
        except KilnError:
            return False
        return self._accepting

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        loaded = self.repository.get(name, version)
        model = loaded.model
        return {
            "name": name,
            "versions": [str(v) for v in sorted(self.repository.served()[name])],
            "platform": "onnxruntime_onnx",
            "inputs": [_tensor_metadata(s.name, s.dtype, s.shape) for s in model.inputs],
            "outputs": [_tensor_metadata(s.name, s.dtype, s.shape) for s in model.outputs],
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """The model's configuration in Triton's ``ModelConfig`` JSON form (config extension)."""
        loaded = self.repository.get(name, version)
        model = loaded.model
        batched = model.batchable and self.policy.max_batch_size > 0

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            entry = {"name": spec.name, "data_type": artifacts.V2_TO_TRITON[spec.dtype]}
            return entry | artifacts.triton_dims(spec.shape, batched)

        config: dict[str, Any] = {
            "name": name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"latest": {"num_versions": self.repository.latest_versions}},
            "max_batch_size": self.policy.max_batch_size if batched else 0,
            "input": [tensor(s) for s in model.inputs],
            "output": [tensor(s) for s in model.outputs],
            "instance_group": [{"name": name, "kind": "KIND_CPU", "count": len(model.engines)}],
            "parameters": {
                "kiln_settings": {"string_value": orjson.dumps(_public_settings(self.settings)).decode()},
                "kiln_batch_cost": {"string_value": str(model.cost.coefficients)},
            },
        }
        if batched and self.policy.batching and model.merges_requests:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(self.policy.max_queue_delay_s * 1e6),
                "preferred_batch_size": [self.policy.max_batch_size],
            }
        return config

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        if name:
            loaded = [self.repository.get(name, version)] if version else self.repository.served_versions(name)
        else:
            loaded = [lv for versions in self.repository.served().values() for lv in versions.values()]
        return {"model_stats": [lv.metrics.triton_stats() for lv in loaded]}

    def repository_index(self, *, ready: bool = False) -> list[dict[str, Any]]:
        """The repository's models and versions; with ``ready``, only those ready for inference (Triton's)."""
        models = self.repository.index()
        return [entry for entry in models if entry.get("state") == "READY"] if ready else models

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    # -- auth -----------------------------------------------------------------------------------------------------
    def authorize(self, authorization: str | None, *, admin: bool = False) -> None:
        """Check an ``Authorization: Bearer <key>`` header's value (HTTP header or gRPC metadata) against the keys.

        Raises:
            Forbidden: ``admin`` and the admin endpoints are disabled.
            Unauthorized: keys are configured and the header is missing, not ``Bearer <key>``, or names no key.
        """
        if admin and not self.settings.admin_enabled:
            raise Forbidden(
                "the repository endpoints (load/unload) are disabled; start the server with --admin and an admin "
                "key (--admin-key or KILN_ADMIN_KEYS) to enable them"
            )
        keys = self.settings.admin_keys if admin else self.settings.api_keys
        if admin and not keys:
            raise Forbidden("admin endpoints need an admin key; none is configured (--admin-key)")
        if not keys:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token or not any(hmac.compare_digest(token, key) for key in keys):
            kind = "an admin key" if admin else "an API key"
            if not (authorization or "").strip():
                sent = "no key was sent"
            elif not token:  # NOTE: never echo the header: it may be the key itself, sent without "Bearer "
                sent = 'an Authorization header was sent, but not in the form "Bearer <key>"'
            elif admin and any(hmac.compare_digest(token, key) for key in self.settings.api_keys or ()):
                sent = "an API key was sent, not an admin key"
            else:
                sent = "an unknown key was sent"
            raise Unauthorized(f"{sent}; this endpoint needs {kind}: send the header `Authorization: Bearer <key>`")

    # -- inference ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def decoding(self, name: str, version: str | None) -> Iterator[None]:
        """Wrap a transport's reading and decoding of an infer request: one it refuses (bad JSON, bad binary data, a
        body too large) counts as a failure of the model it was sent to, by the error's reason, as :meth:`infer`
        counts the requests it refuses."""
        started = time.perf_counter()
        try:
            yield
        except KilnError as exc:
            with contextlib.suppress(KilnError):  # an unknown model or version has no metrics to count it in
                loaded = self.repository.get(name, version)
                loaded.metrics.finished(time.perf_counter() - started, "failure", _reason(exc))
            raise

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Validate, queue, batch, run and split one request.

        Raises:
            ModelNotFound: unknown model or version.
            InvalidInput: the request does not fit the model's signature or the server's limits.
            Overloaded: the server is draining, the queue is full, or the deadline cannot be met.
        """
        started = time.perf_counter()
        if not self._accepting:
            state = "is still loading its models" if self._starting else "is shutting down"
            raise Overloaded(f"the server {state} and accepts no requests now; retry shortly or on another replica")
        loaded = self.repository.get(name, version)
        metrics = loaded.metrics
        self._inflight += 1
        metrics.inflight.inc()
        try:
            # a request larger than the whole queue could never be queued: refused as too large, not "retry later"
            max_rows = min(self.settings.max_rows_per_request, self.settings.max_queue_rows)
            if loaded.model.slow_to_prepare(request, max_rows=max_rows):  # long texts: tokenize off the event loop
                work = await asyncio.to_thread(loaded.model.prepare, request, max_rows=max_rows)
            else:
                work = loaded.model.prepare(request, max_rows=max_rows)
            timeout_s = request.timeout_s
            if timeout_s is None and self.settings.default_timeout_ms:
                timeout_s = self.settings.default_timeout_ms / 1000
            outputs = await loaded.batcher.submit(work, timeout_s=timeout_s)
        except KilnError as exc:
            metrics.finished(time.perf_counter() - started, "failure", _reason(exc))
            raise
        except Exception:
            metrics.finished(time.perf_counter() - started, "failure", "internal")
            raise
        except asyncio.CancelledError:  # the client went away (gRPC cancels the handler)
            metrics.finished(time.perf_counter() - started, "failure", "cancelled")
            raise
        finally:
            self._inflight -= 1
            metrics.inflight.dec()
            if not self._inflight:
                self._idle.set()
        metrics.finished(time.perf_counter() - started, "success")
        return _response(loaded, request, outputs)


def _response(loaded: LoadedVersion, request: InferRequest, outputs: dict[str, Any]) -> InferResponse:
    said = {out.name: out.binary for out in request.outputs if out.binary is not None}
    return InferResponse(
        model_name=loaded.model.name,
        model_version=str(loaded.version),
        outputs=outputs,
        binary={name: said.get(name, request.binary_output_default) for name in outputs},
        id=request.id,
    )


def _public_settings(settings: ServeSettings) -> dict[str, Any]:
    """Settings safe to show any client: never the keys."""
    return {k: v for k, v in settings_dict(settings).items() if k not in ("api_keys", "admin_keys")}


def _reason(exc: KilnError) -> str:
    """The failure's label: the reason the error gives (an overload's ``queue_full`` or ``deadline``), else its kind."""
    return str(exc.details.get("reason") or type(exc).__name__.lower())


def _tensor_metadata(name: str, dtype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"name": name, "datatype": dtype, "shape": list(shape)}


def check_repository_request(verb: str, model_name: str, parameters: list[str]) -> None:
    """A repository load/unload names one model of the repository and sets no parameters (over HTTP and gRPC).

    ``unload_dependents`` is allowed on unload: tritonclient always sends it, and Kiln serves no ensembles, so
    there are none to unload.
    """
    if verb == "unload":
        parameters = [p for p in parameters if p != "unload_dependents"]
    if not model_name:
        raise InvalidInput(f"model_name is empty; name the model to {verb}")
    if "/" in model_name or "\\" in model_name or model_name in (".", ".."):
        # NOTE: the repository joins the name to its directory; a path here would reach outside it
        raise InvalidInput(f'model_name "{model_name}" is a path; name a model of the repository', model=model_name)
    if parameters:
        raise InvalidInput(
            f'parameter "{parameters[0]}" of {verb} is not supported: this server {verb}s the versions in its '
            "repository as they are on disk; write a new version with `kiln export`, then load",
            model=model_name,
        )
