"""Run a repository: load and warm every model, then HTTP and gRPC on one event loop, until SIGTERM.

Start-up order: bind the ports (so a port clash fails at once), load and warm the models, then accept traffic;
``/v2/health/ready`` turns 200 only then. SIGHUP re-reads the repository and swaps in new versions once warm.
SIGTERM or SIGINT: stop accepting, answer every request already received, close gRPC within its grace period,
exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.config import ServeSettings
from kiln.serve.dataplane import DataPlane

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

        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another port with --http-port/--grpc-port",
            host=host,
            port=port,
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve_async(
    root: Path,
    settings: ServeSettings,
    *,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Serve ``root`` until SIGTERM/SIGINT (or until the HTTP server stops); drains before returning."""
    from kiln.serve.http import run_http

    started = time.perf_counter()
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
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on the main thread, or not on POSIX
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(plane.repository.reload()))

    async def on_shutdown() -> None:
        if grpc_server is not None:
            await grpc_server.stop(settings.drain_timeout_s)
        await plane.close()
        logger.info("drained and stopped")

    await run_http(plane, http_sock, on_shutdown=on_shutdown)


def serve(root: Path | str, settings: ServeSettings | None = None, **overrides: Any) -> None:
    """Run ``kiln serve`` in this process (blocking) on uvloop where available.

    Example:
        >>> serve("kiln-repo", http_port=8000, grpc_port=8001)  # doctest: +SKIP
    """
    from kiln.config import resolve

    settings = settings or resolve(ServeSettings, overrides)
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
