"""KServe V2 over HTTP (plus Triton's binary tensor, configuration, statistics and repository extensions).

The app is built from a visible list of routes; the only mapping from Kiln errors to HTTP status codes is
``STATUS`` below. Every client mistake is a 4xx with ``{"error": "..."}``; a 500 means a bug in Kiln.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from kiln.config import ServeSettings
from kiln.errors import (
    ArtifactError,
    ClientClosed,
    ConfigError,
    Forbidden,
    InvalidInput,
    KilnError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from kiln.serve.codec import json_text, to_bytes, to_json_data, v2_datatype
from kiln.serve.dataplane import DataPlane, check_repository_request
from kiln.serve.httpcodec import (
    HEADER_LENGTH,
    TIMEOUT_HEADER,
    decode_infer,
    inflate,
    is_ascii_digits,
    json_object,
    optional_json_object,
)
from kiln.serve.protocol import InferResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")

_JSON = "application/json"

# The one table from Kiln errors to HTTP status codes (most specific first). Overloaded uses the configured code.
STATUS: list[tuple[type[KilnError], int]] = [
    (PayloadTooLarge, 413),
    (RequestTimeout, 408),
    (InvalidInput, 400),
    (ConfigError, 400),
    (ModelNotFound, 404),
    (Unauthorized, 401),
    (Forbidden, 403),
    (ArtifactError, 409),
    (Overloaded, 503),
    (ClientClosed, 499),  # nginx's code for it; the client never sees it, the access log and the metrics do
]


def status_of(exc: KilnError, overload_status: int) -> int:
    if isinstance(exc, Overloaded):
        return overload_status
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return 500


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=_JSON, headers=headers)


# -- request decoding -------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading, when Content-Length says so).

    Raises:
        RequestTimeout: the body paused for more than ``timeout_s`` between two reads.
        ClientClosed: the client closed its connection part-way.
    """
    declared = request.headers.get("content-length")
    if declared is not None and not is_ascii_digits(declared):
        raise InvalidInput(
            f"Content-Length is {declared!r}; it must be the body's length in bytes, written in ASCII digits"
        )
    if declared is not None and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body is {int(declared)} bytes; this server accepts at most {limit} bytes; split the request "
            "or raise --max-request-bytes",
            size=int(declared),
            limit=limit,
        )
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s) as pause:  # one timer for the body, pushed back by every chunk
            async for chunk in request.stream():
                pause.reschedule(loop.time() + timeout_s)
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"request body exceeds {limit} bytes; split the request or raise --max-request-bytes",
                        limit=limit,
                    )
                chunks.append(chunk)
    except TimeoutError:
        of = f" of the {declared} its Content-Length declares" if declared is not None else ""
        raise RequestTimeout(
            f"the request body stopped arriving: {size} bytes{of} came, then nothing for {timeout_s:g} s; send "
            "the whole body without pausing, or raise the server's --body-timeout-s",
            received=size,
            timeout_s=timeout_s,
            reason="body_timeout",
        ) from None
    except ClientDisconnect:
        raise ClientClosed(
            f"the client closed the connection after {size} bytes of the request body", reason="cancelled"
        ) from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "deflate"):
        body = inflate(body, encoding, limit)
    elif encoding not in ("", "identity"):
        raise InvalidInput(f'Content-Encoding "{encoding}" is not supported; use gzip, deflate or none')
    return body


async def _optional_json_object(request: Request, settings: ServeSettings) -> dict[str, Any]:
    """A repository request's body: optional (empty: ``{}``); when sent, a JSON object."""
    return optional_json_object(await read_body(request, settings.max_request_bytes, settings.body_timeout_s))


async def _repository_parameters(request: Request, settings: ServeSettings) -> list[str]:
    """The names in a repository load/unload body's ``parameters``."""
    payload = await _optional_json_object(request, settings)
    return list(json_object(payload.get("parameters"), '"parameters"'))


# The scope key under which Kiln's HTTP protocol (http_protocol) keeps callbacks to run when the client disconnects
# before its response is complete.
ON_DISCONNECT = "kiln.on_disconnect"


async def _unless_the_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelled when the client disconnects first: a request still queued then leaves the queue,
    and its batch slot and compute go to clients that are still waiting (one already running finishes unseen).

    Under Kiln's own protocol the connection tells this request when it is lost (no task is made); under any other
    ASGI server a watcher task waits for ``http.disconnect``.

    Raises:
        ClientClosed: the client disconnected before ``work`` was done.
    """
    hooks: list[Callable[[], None]] | None = request.scope.get(ON_DISCONNECT)
    if hooks is None:
        return await _watching_for_disconnect(request, work)
    this = asyncio.current_task()
    assert this is not None
    left = False

    def leave() -> None:
        nonlocal left
        left = True
        this.cancel()

    hooks.append(leave)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise  # this handler was cancelled (a shutdown past its grace period), not by the client leaving
        this.uncancel()
        raise ClientClosed("the client closed the connection before its answer was ready", reason="cancelled") from None
    finally:
        hooks.remove(leave)


async def _watching_for_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        # NOTE: with the body read, uvicorn's receive() returns only once the client has gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not (left and task.cancelled()):
            raise  # this handler was cancelled (a shutdown past its grace period), not by the watcher
        raise ClientClosed("the client closed the connection before its answer was ready", reason="cancelled") from None
    finally:
        watcher.cancel()


def encode_infer(response: InferResponse) -> Response:
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array), "shape": list(array.shape)}
        if response.binary.get(name):
            blob = to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype.kind in "fiub":
            entry["data"] = array.reshape(-1)  # orjson writes numpy arrays natively
        else:
            entry["data"] = to_json_data(array)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    body["outputs"] = outputs
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(header, media_type=_JSON)
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# -- the app ------------------------------------------------------------------------------------------------------
def build_app(plane: DataPlane, *, lifespan: Any = None) -> Starlette:
    """The Starlette app for a data plane: V2 routes, extensions, ``/metrics``, and the error table."""
    settings: ServeSettings = plane.settings

    def version_of(request: Request) -> str | None:
        value: str | None = request.path_params.get("version")
        return value

    async def live(request: Request) -> Response:
        return _json({"live": plane.live()}, 200 if plane.live() else 503)

    async def ready(request: Request) -> Response:
        ok = plane.ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return _json(plane.server_metadata())

    async def model_metadata(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        return _json(plane.model_metadata(request.path_params["model"], version_of(request)))

    async def model_ready(request: Request) -> Response:
        ok = plane.model_ready(request.path_params["model"], version_of(request))
        return _json({"name": request.path_params["model"], "ready": ok}, 200 if ok else 400)

    async def model_config(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        return _json(plane.model_config(request.path_params["model"], version_of(request)))

    async def model_stats(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        return _json(plane.statistics(request.path_params.get("model"), version_of(request)))

    async def infer(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        model, version = request.path_params["model"], version_of(request)
        plane.repository.get(model, version)  # 404 before reading a body
        with plane.decoding(model, version):
            body = await read_body(request, settings.max_request_bytes, settings.body_timeout_s)
            decoded = decode_infer(body, request.headers.get(HEADER_LENGTH), request.headers.get(TIMEOUT_HEADER))
        response = await _unless_the_client_leaves(request, plane.infer(model, version, decoded))
        return encode_infer(response)

    async def repository_index(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        ready = (await _optional_json_object(request, settings)).get("ready", False)
        if not isinstance(ready, bool):  # {"ready": true} was ignored: every model came back, unloaded ones too
            raise InvalidInput(f'"ready" is {json_text(ready)}; it must be true or false (or left out)')
        return _json(plane.repository_index(ready=ready))

    async def repository_load(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"), admin=True)
        name = request.path_params["model"]
        check_repository_request("load", name, await _repository_parameters(request, settings))
        await plane.repository.load(name)
        return _json({})

    async def repository_unload(request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"), admin=True)
        name = request.path_params["model"]
        check_repository_request("unload", name, await _repository_parameters(request, settings))
        await plane.repository.unload(name)
        return _json({})

    async def metrics(request: Request) -> Response:
        return Response(plane.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def kiln_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KilnError)
        status = status_of(exc, settings.overload_status)
        headers: dict[str, str] = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(int(exc.details.get("retry_after_s", 1)))
        elif isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        elif isinstance(exc, RequestTimeout):  # the rest of its body may still come: it must not read as a request
            headers["Connection"] = "close"
        elif isinstance(exc, ClientClosed):  # nobody to answer; counted as "cancelled" in the metrics
            logger.debug("%s %s: %s", request.method, request.url.path, exc)
        if status >= 500 and not isinstance(exc, Overloaded):
            logger.error("request %s %s failed: %s", request.method, request.url.path, exc)
        return _json({"error": exc.message}, status, headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json({"error": f"internal error ({type(exc).__name__}); the server log has the details"}, 500)

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [  # Starlette tries them in order: the hot path first
        Route(f"{model}/infer", infer, methods=["POST"]),
        Route(f"{versioned}/infer", infer, methods=["POST"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route(f"{model}/ready", model_ready, methods=["GET"]),
        Route(f"{versioned}/ready", model_ready, methods=["GET"]),
        Route(f"{model}/config", model_config, methods=["GET"]),
        Route(f"{versioned}/config", model_config, methods=["GET"]),
        Route(f"{model}/stats", model_stats, methods=["GET"]),
        Route(f"{versioned}/stats", model_stats, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={KilnError: kiln_error, Exception: internal_error, 404: _not_found, 405: _bad_method},
    )
    # a trailing slash got a 307 with an empty body to a Location built from the client's Host header; a 404
    # that says what to drop serves an API client better, and the server never sends a client elsewhere
    app.router.redirect_slashes = False
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    fix = (
        f"drop the trailing slash ({path.rstrip('/')})"
        if len(path) > 1 and path.endswith("/")
        else ("see the KServe V2 protocol (e.g. POST /v2/models/{model}/infer)")
    )
    return _json({"error": f"no route for {request.method} {path}; {fix}"}, 404)


async def _bad_method(request: Request, exc: Exception) -> Response:
    allowed = getattr(exc, "headers", None) or {}
    names = sorted(m.strip() for m in (allowed.get("Allow") or allowed.get("allow") or "").split(",") if m.strip())
    fix = f"; use {' or '.join(names)}" if names else ""  # sorted: Starlette's order comes from a set
    headers = {"Allow": ", ".join(names)} if names else None
    return _json({"error": f"{request.method} is not allowed on {request.url.path}{fix}"}, 405, headers)


_NOT_HTTP = orjson.dumps(
    {
        "error": "the request is not valid HTTP/1.1 (a request line, header names and values, chunk sizes or the "
        "Content-Length could not be parsed); send a well-formed request, e.g. with tritonclient or curl"
    }
)


def http_protocol() -> type[Any]:
    """uvicorn's httptools protocol, answering a request it cannot parse with a JSON error like every other 4xx
    (uvicorn's own answer is text/plain)."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class JsonErrorsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # (cycle, its disconnect hooks) of the requests on this connection not yet answered: more than one
            # only when a client pipelines
            self._open: list[tuple[Any, list[Callable[[], None]]]] = []

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            hooks: list[Callable[[], None]] = []
            # The cycle's task has not run yet: the scope it will see still takes the key.
            self.scope[ON_DISCONNECT] = hooks  # type: ignore[literal-required]
            self._open = [(c, h) for c, h in self._open if not c.response_complete]
            self._open.append((self.cycle, hooks))

        def connection_lost(self, exc: Exception | None) -> None:
            unanswered = [list(h) for c, h in self._open if not c.response_complete]
            self._open = []
            super().connection_lost(exc)
            for hooks in unanswered:
                for hook in hooks:
                    hook()

        def send_400_response(self, msg: str) -> None:
            head = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.append(
                f"content-type: {_JSON}\r\ncontent-length: {len(_NOT_HTTP)}\r\nconnection: close\r\n\r\n".encode()
            )
            self.transport.write(b"".join([*head, _NOT_HTTP]))
            self.transport.close()

    return JsonErrorsProtocol


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but a second SIGINT during the drain does not cut the requests in flight off.

        uvicorn force-exits on it: the requests still running got 500s (text, not JSON) and the process died by
        SIGABRT with ONNX Runtime's threads still running. The drain is bounded by ``--drain-timeout-s`` anyway,
        and a second SIGTERM was already ignored.
        """

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:  # NOTE: a signal handler: no logging here (its locks)
                super().handle_exit(sig, frame)

    return DrainingServer


async def run_http(plane: DataPlane, sock: Any, *, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve the app on a bound socket until SIGINT/SIGTERM; then finish in-flight requests and return.

    uvicorn stops accepting, lets every open request complete, then ``on_shutdown`` runs (the gRPC server's
    grace period and the data plane's drain).
    """
    import contextlib

    import uvicorn

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = build_app(plane, lifespan=lifespan)
    config = uvicorn.Config(
        app,
        loop="none",  # the caller owns the (uvloop) event loop
        http=http_protocol(),
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(plane.settings.drain_timeout_s),
        limit_concurrency=None,
    )
    server = _draining_server_class()(config)
    await server.serve(sockets=[sock])
