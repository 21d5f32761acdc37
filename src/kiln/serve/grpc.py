"""KServe V2 over gRPC: ``inference.GRPCInferenceService``, wire-compatible with Triton's.

``tritonclient.grpc`` and ``perf_analyzer -i grpc`` work unchanged. The service is built from a visible table
of RPCs (``_rpcs``); each calls one ``DataPlane`` method, as the HTTP routes do. The only mapping from Kiln
errors to gRPC status codes is ``STATUS`` below; a client's mistake is never INTERNAL.

Example:
    >>> server = await start_grpc(plane, "127.0.0.1", 8001)  # doctest: +SKIP
    >>> await server.stop(grace_s=30)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from kiln.errors import (
    ArtifactError,
    ConfigError,
    Forbidden,
    InvalidInput,
    KilnError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
)
from kiln.serve.dataplane import DataPlane, check_repository_request
from kiln.serve.proto import grpc_service_pb2 as pb
from kiln.serve.proto import model_config_pb2 as config_pb
from kiln.serve.proto.convert import decode_infer, encode_infer, from_dict

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

# The one table from Kiln errors to gRPC status codes (most specific first; anything else is INTERNAL).
# PayloadTooLarge is RESOURCE_EXHAUSTED, the code gRPC itself gives a message over max_receive_message_length.
STATUS: list[tuple[type[KilnError], grpc.StatusCode]] = [
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.UNAVAILABLE),
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
M = TypeVar("M", bound=Message)
Context = Any  # grpc.aio.ServicerContext (grpcio ships no type information)


def status_of(exc: KilnError) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def trailing_metadata(exc: KilnError) -> tuple[tuple[str, str], ...]:
    """Retry advice for an overloaded server (seconds, as HTTP's Retry-After; and gRPC's pushback in ms)."""
    if isinstance(exc, Overloaded):
        retry_after_s = float(exc.details.get("retry_after_s", 1))
        return (("retry-after", f"{retry_after_s:g}"), ("grpc-retry-pushback-ms", str(int(retry_after_s * 1000))))
    if isinstance(exc, Unauthorized):
        return (("www-authenticate", "Bearer"),)
    return ()


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    if isinstance(exc, KilnError):
        code = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("gRPC call failed: %s", exc)
        await context.abort(code, exc.message, trailing_metadata=trailing_metadata(exc))
    else:
        logger.error("internal error in a gRPC call", exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"
        )
    raise AssertionError("context.abort returned")  # it raises; this line is for the type checker


def parse(message_type: type[M], data: bytes) -> M:
    """A request message from its wire bytes; bytes that are not one are the client's mistake (InvalidInput).

    NOTE: the handlers take raw bytes and parse here, not in a ``request_deserializer``: gRPC answers a
    deserializer's exception with UNKNOWN and logs a traceback, for what is a client's malformed message.
    """
    message: M = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        name = message_type.DESCRIPTOR.full_name
        raise InvalidInput(
            f"the request ({len(data)} bytes) is not a valid {name} message ({exc}); send a message of "
            "grpc_service.proto (Triton's), as tritonclient.grpc does"
        ) from exc
    return message


def _guarded(
    method: Callable[[Req, Context], Awaitable[Resp]], request_type: type[Req]
) -> Callable[[bytes, Context], Awaitable[Resp]]:
    """The RPC on the request's wire bytes, with every exception turned into a status from ``STATUS`` (never a
    traceback to the client)."""

    async def call(data: bytes, context: Context) -> Resp:
        try:
            return await method(parse(request_type, data), context)
        except Exception as exc:  # CancelledError (the client went away) is a BaseException and passes
            await _abort(context, exc)

    return call


def authorization(context: Context) -> str | None:
    """The value of the ``authorization`` metadata entry (``Bearer <key>``; :meth:`DataPlane.authorize` reads it)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _version(value: str) -> str | None:
    return value or None


class InferenceService:
    """The RPCs of ``inference.GRPCInferenceService`` over one data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.stopping = asyncio.Event()  # set by GrpcServer.stop: open streams stop reading and end

    async def server_live(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    async def server_ready(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def model_ready(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, _version(request.version)))

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return from_dict(self.plane.server_metadata(), pb.ServerMetadataResponse())

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        self.plane.authorize(authorization(context))
        metadata = self.plane.model_metadata(request.name, _version(request.version))
        return from_dict(metadata, pb.ModelMetadataResponse())

    async def model_config(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        self.plane.authorize(authorization(context))
        config = self.plane.model_config(request.name, _version(request.version))
        return pb.ModelConfigResponse(config=from_dict(config, config_pb.ModelConfig()))

    async def model_statistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        self.plane.authorize(authorization(context))
        statistics = self.plane.statistics(request.name or None, _version(request.version))
        return from_dict(statistics, pb.ModelStatisticsResponse())

    async def model_infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        self.plane.authorize(authorization(context))
        version = _version(request.model_version)
        with self.plane.decoding(request.model_name, version):
            decoded = decode_infer(request, context.time_remaining())
        response = await self.plane.infer(request.model_name, version, decoded)
        return encode_infer(response)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (and batch together); each answer carries its request's id,
        and a failed request (a malformed message too) answers ``error_message`` without ending the stream
        (Triton's behaviour)."""
        try:
            self.plane.authorize(authorization(context))
        except KilnError as exc:
            await _abort(context, exc)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def answer(data: bytes) -> None:
            request = pb.ModelInferRequest()  # what a failure echoes when the message itself is malformed
            try:
                request = parse(pb.ModelInferRequest, data)
                version = _version(request.model_version)
                with self.plane.decoding(request.model_name, version):
                    decoded = decode_infer(request, None)
                response = await self.plane.infer(request.model_name, version, decoded)
                await answers.put(pb.ModelStreamInferResponse(infer_response=encode_infer(response)))
            except Exception as exc:
                if not isinstance(exc, KilnError):
                    logger.error("internal error in a gRPC stream request", exc_info=exc)
                message = exc.message if isinstance(exc, KilnError) else f"internal error ({type(exc).__name__})"
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                await answers.put(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))

        running: set[asyncio.Task[None]] = set()
        reading = True

        async def read() -> None:
            nonlocal reading
            try:
                async for data in requests:
                    task = asyncio.create_task(answer(data))
                    running.add(task)
                    task.add_done_callback(running.discard)
            finally:
                # The client closed its side, or the server is stopping (the loop above was cancelled, so an idle
                # stream does not hold the shutdown for its whole grace period): answer every request received.
                reading = False
                await asyncio.gather(*running)
                await answers.put(None)

        def stop_reading(_: asyncio.Task[bool]) -> None:
            if reading:  # NOTE: never cancel the gather above: that would cancel the requests it waits for
                reader.cancel()

        reader = asyncio.create_task(read())
        stopping = asyncio.create_task(self.stopping.wait())
        stopping.add_done_callback(stop_reading)
        try:
            while (item := await answers.get()) is not None:
                yield item
            if not reader.cancelled():
                await reader  # re-raises a failure to read the stream
            elif self.stopping.is_set():
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; every request of this stream has its answer; open a new stream "
                    "(to another replica)",
                )
        finally:  # the client went away (or the stream is over): nothing left runs for it
            stopping.cancel()
            reader.cancel()
            for task in running:
                task.cancel()

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        self.plane.authorize(authorization(context))
        models = self.plane.repository_index(ready=request.ready)
        return from_dict({"models": models}, pb.RepositoryIndexResponse())

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self.plane.authorize(authorization(context), admin=True)
        check_repository_request("load", request.model_name, list(request.parameters))
        await self.plane.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self.plane.authorize(authorization(context), admin=True)
        check_repository_request("unload", request.model_name, list(request.parameters))
        await self.plane.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _rpcs(service: InferenceService) -> dict[str, Any]:
    """The method handlers of the service, by RPC name (the names and message types of grpc_service.proto)."""
    unary: dict[str, tuple[Callable[[Any, Context], Awaitable[Any]], Any, Any]] = {
        "ServerLive": (service.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (service.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (service.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (service.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (service.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (service.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        "ModelConfig": (service.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelStatistics": (service.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
        "RepositoryIndex": (service.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        "RepositoryModelLoad": (
            service.repository_model_load,
            pb.RepositoryModelLoadRequest,
            pb.RepositoryModelLoadResponse,
        ),
        "RepositoryModelUnload": (
            service.repository_model_unload,
            pb.RepositoryModelUnloadRequest,
            pb.RepositoryModelUnloadResponse,
        ),
    }
    # No request_deserializer: the handlers get the wire bytes and parse them themselves (see ``parse``).
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(method, request), response_serializer=response.SerializeToString
        )
        for name, (method, request, response) in unary.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        service.model_stream_infer, response_serializer=pb.ModelStreamInferResponse.SerializeToString
    )
    declared = {method.name for method in SERVICE.methods}
    assert set(handlers) == declared, f"handlers {sorted(handlers)} != RPCs of the proto {sorted(declared)}"
    return handlers


@dataclass
class GrpcServer:
    """A started gRPC server; ``port`` is the port it is bound to (the chosen one when asked for 0)."""

    server: Any  # grpc.aio.Server
    port: int
    service: InferenceService

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; let calls in flight finish for up to ``grace_s`` seconds, then cancel them.

        An open ModelStreamInfer stream reads no more requests: it answers those it has, then ends (UNAVAILABLE),
        so an idle stream does not hold the shutdown for ``grace_s``.
        """
        self.service.stopping.set()
        await self.server.stop(grace_s)


async def start_grpc(plane: DataPlane, host: str, port: int) -> GrpcServer:
    """Serve ``plane`` over gRPC on ``host:port`` (0: a free port) on the running event loop.

    Messages larger than ``plane.settings.max_request_bytes`` are refused by gRPC with RESOURCE_EXHAUSTED.

    Raises:
        ConfigError: the address cannot be bound (e.g. the port is taken).
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", plane.settings.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port clash fails here instead of sharing the port with another server
        ]
    )
    service = InferenceService(plane)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, _rpcs(service)),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = int(server.add_insecure_port(address))
    except RuntimeError as exc:  # grpcio >= 1.5x raises; older versions return 0
        logger.debug("binding %s failed: %s", address, exc)
        bound = 0
    if not bound:
        raise ConfigError(
            f"cannot listen for gRPC on {address} (the port is in use, or the host is not an address of this "
            "machine); choose another port with --grpc-port, or turn gRPC off with --grpc-port 0",
            host=host,
            port=port,
        )
    await server.start()
    logger.info("gRPC (KServe V2 inference.GRPCInferenceService) on %s port %d", host, bound)
    return GrpcServer(server, bound, service)
