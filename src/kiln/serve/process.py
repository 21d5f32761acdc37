"""``kiln serve`` in a child process: start it, wait until ready, stop it with SIGTERM, check it drained.

The demo (``kiln quickstart``) and the benchmarks run the server exactly as a user would, in its own process, so
the load generator and the server do not share a GIL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from kiln.errors import KilnError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports nothing listens on right now.

    Held open together while they are chosen: one ``free_port()`` after another can hand back the same port (the
    kernel may reuse a port just released), and then the second server cannot bind it while a client of the
    first takes that server's answers for the second's (seen once in ``bench/serve_minilm.py``).
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ServerProcess:
    """A ``kiln serve`` child process on a free port.

    Example:
        >>> with ServerProcess(Path("kiln-repo"), "--models", "minilm") as server:  # doctest: +SKIP
        ...     load_test(server.url, "minilm")
        >>> server.exit_code  # doctest: +SKIP
        0
    """

    def __init__(self, repository: Path, *args: str, host: str = "127.0.0.1", ready_timeout_s: float = 120.0) -> None:
        self.repository = repository
        self.args = args
        self.host = host
        self.port = free_port(host)
        self.ready_timeout_s = ready_timeout_s
        self.url = f"http://{host}:{self.port}"
        self.ready_s: float | None = None
        self.exit_code: int | None = None
        self.log = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        """Start the server and wait until ``/v2/health/ready`` answers 200; ``ready_s`` is start to ready."""
        started = time.perf_counter()
        command = [sys.executable, "-m", "kiln", "serve", str(self.repository), "--host", self.host]
        command += ["--http-port", str(self.port), "--grpc-port", "0", *self.args]
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
        )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()  # never leave a server behind, whatever interrupted the wait
            raise
        return self

    def _wait_ready(self, started: float) -> None:
        assert self._process is not None
        deadline = started + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if self._process.poll() is not None:
                self.stop()
                raise KilnError(f"kiln serve exited with code {self.exit_code} before it was ready:\n{self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        self.ready_s = time.perf_counter() - started
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.02)
        self.stop()
        raise KilnError(f"kiln serve was not ready after {self.ready_timeout_s:.0f} s:\n{self.log}")

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for CPU accounting from ``/proc``)."""
        return self._process.pid if self._process is not None else None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait for the drain, collect the log; returns the exit code (0 after a clean drain)."""
        process = self._process
        if process is None:
            return self.exit_code if self.exit_code is not None else 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        self.log = output.decode("utf-8", errors="replace")
        self.exit_code = process.returncode
        self._process = None
        return self.exit_code

    def send(self, signum: int) -> None:
        """Send a signal (SIGHUP reloads the repository)."""
        if self._process is not None:
            self._process.send_signal(signum)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
