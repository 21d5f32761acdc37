"""Run a repository: load and warm every model, then HTTP and gRPC on one event loop, until SIGTERM.

Start-up order: bind the ports (so a port clash fails at once), load and warm the models, then accept traffic;
``/v2/health/ready`` turns 200 only then. SIGHUP re-reads the repository and swaps in new versions once warm.
SIGTERM or SIGINT: stop accepting, answer every request already received, close gRPC within its grace period,
exit 0. Before the server is ready, SIGTERM or SIGINT stop the start-up instead (the model loading at that moment
finishes on its worker thread first) and exit 0 as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from kiln.config import ServeSettings
from kiln.serve.dataplane import DataPlane

if TYPE_CHECKING:
    from kiln.serve.grpc import GrpcServer

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from kiln.errors import ConfigError

        # a name that does not resolve, or an address of another machine, is the host's fault, not the port's
        host_fault = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
        fix = (
            "pass --host an address of this machine (127.0.0.1, or 0.0.0.0 for every interface)"
            if host_fault
            else "choose another port with --http-port/--grpc-port"
        )
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); {fix}",
            host=host,
            port=port,
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _SignalsUntilServing:
    """SIGTERM and SIGINT from the start of ``serve_async`` until uvicorn handles them itself.

    While the models load, the first signal cancels the start-up task. Once they are loaded, a signal is kept and
    handed to uvicorn as soon as its own handlers are in place (it installs them when ``serve`` starts), so it
    stops accepting and drains as for any signal. On leaving, the previous handlers come back and a signal kept
    (or re-raised by uvicorn after its drain, as it does) goes on to them: ``serve``'s no-op ones, exit code 0.
    On the main thread only, as uvicorn: elsewhere signals cannot be handled.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None  # the last signal received and not handed on yet
        self._loop = asyncio.get_running_loop()
        self._start_up: asyncio.Task[Any] | None = None
        self._serving = False
        self._previous: dict[int, Any] = {}
        self._restored = False

    def __enter__(self) -> _SignalsUntilServing:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._restored = True
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.signum is not None and self._previous:
            signal.raise_signal(self.signum)

    def watch(self, start_up: asyncio.Task[Any]) -> None:
        self._start_up = start_up
        if self.signum is not None:  # the signal came before the task existed
            start_up.cancel()

    def serving(self) -> None:
        """The start-up is over: from now on a signal is for uvicorn; call once ``run_http`` is awaited."""
        self._serving = True
        self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        if self._restored or not self._previous:
            return
        if signal.getsignal(signal.SIGTERM) == self._handle:  # uvicorn has not installed its handlers yet
            self._loop.call_later(0.01, self._hand_over)
            return
        if self.signum is not None:
            signum, self.signum = self.signum, None
            signal.raise_signal(signum)  # to uvicorn's handler: stop accepting, drain

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # NOTE: a Python signal handler runs between any two bytecodes of the event loop: no logging (its locks),
        # no task.cancel() from here; schedule it. Cancel once: a second cancel would cut the clean-up short.
        cancel = self.signum is None and not self._serving and self._start_up is not None
        self.signum = signum
        if cancel and self._start_up is not None:
            self._loop.call_soon_threadsafe(self._start_up.cancel)


async def _start(root: Path, settings: ServeSettings) -> tuple[socket.socket, GrpcServer | None, DataPlane]:
    """Bind the ports, then load and warm the models; on any failure or cancellation, undo what was done."""
    http_sock = bind(settings.host, settings.http_port)
    plane = DataPlane(root, settings)
    grpc_server = None
    try:
        if settings.grpc_port:  # 0: no gRPC. Bound before loading, so a port clash fails at once.
            from kiln.serve.grpc import start_grpc

            grpc_server = await start_grpc(plane, settings.host, settings.grpc_port)
        await plane.start()
    except BaseException:
        http_sock.close()
        if grpc_server is not None:
            await grpc_server.stop(0)
        await plane.close()
        raise
    return http_sock, grpc_server, plane


async def serve_async(
    root: Path,
    settings: ServeSettings,
    *,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Serve ``root`` until SIGTERM/SIGINT (or until the HTTP server stops); drains before returning.

    A SIGTERM/SIGINT before the server is ready stops the start-up: the model loading at that moment finishes (on
    its worker thread), the ports close, and the signal goes on to the handler in place before, as uvicorn hands
    it on after a drain.
    """
    started = time.perf_counter()
    with _SignalsUntilServing() as signals:  # first: a signal from here on stops the start-up
        from kiln.serve.http import run_http

        start_up = asyncio.get_running_loop().create_task(_start(root, settings), name="kiln-start-up")
        signals.watch(start_up)
        try:
            http_sock, grpc_server, plane = await start_up
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if signals.signum is None or (this is not None and this.cancelling()):
                raise  # serve_async itself was cancelled, not the start-up by a signal
            logger.info("start-up stopped by signal %d; exiting", signals.signum)
            return
        ready_s = time.perf_counter() - started
        info = {
            "http": f"http://{settings.host}:{http_sock.getsockname()[1]}",
            "grpc": f"{settings.host}:{grpc_server.port}" if grpc_server is not None else None,
            "models": {name: sorted(versions) for name, versions in plane.repository.served().items()},
            "ready_s": ready_s,
        }
        logger.info("ready in %.2f s: %s", ready_s, info)
        if on_ready is not None:
            on_ready(info)

        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

        def reload() -> None:
            task = loop.create_task(plane.repository.reload(settings.models))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on the main thread, or not on POSIX
            loop.add_signal_handler(signal.SIGHUP, reload)

        async def on_shutdown() -> None:
            if grpc_server is not None:
                await grpc_server.stop(settings.drain_timeout_s)
            await plane.close()
            logger.info("drained and stopped")

        signals.serving()
        await run_http(plane, http_sock, on_shutdown=on_shutdown)


def serve(root: Path | str, settings: ServeSettings | None = None, **overrides: Any) -> None:
    """Run ``kiln serve`` in this process (blocking) on uvloop where available; ``kiln.serve_models`` at the top.

    ``overrides`` (setting names) go over ``settings``, or over the resolved defaults (``KILN_*`` variables) when
    there are none.

    Example:
        >>> serve("kiln-repo", http_port=8000, grpc_port=8001)  # doctest: +SKIP
    """
    import dataclasses

    from kiln.config import check_settings_object, resolve

    # the overrides were dropped whenever settings were passed too
    if settings is not None:
        settings = dataclasses.replace(check_settings_object(settings, ServeSettings), **overrides)
    else:
        settings = resolve(ServeSettings, overrides)
    # uvicorn re-raises the SIGTERM/SIGINT it handled once it has drained; these no-op handlers receive it,
    # so a graceful shutdown ends with exit code 0 instead of death by signal.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _run(serve_async(Path(root), settings))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: Any) -> None:
    logger.debug("signal %d received after shutdown", signum)


def _run(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(main)
        return
    uvloop.run(main)
