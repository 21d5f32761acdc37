"""``kiln serve``: a KServe V2 server (HTTP + gRPC) over a model repository."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from kiln.cli._console import err_console


def serve(
    repository: Path = typer.Argument(..., help="Model repository directory (made by `kiln export`)."),
    host: str = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    http_port: int = typer.Option(None, "--http-port", help="HTTP port (default 8000; 0 picks a free one)."),
    grpc_port: int = typer.Option(None, "--grpc-port", help="gRPC port (default 8001; 0 turns gRPC off)."),
    models: str = typer.Option(None, "--models", help="Comma-separated models to load (default: all)."),
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="Most rows in one batch (default 32)."),
    max_queue_delay_ms: float = typer.Option(
        None, "--max-queue-delay-ms", help="Longest wait for batch-mates, when waiting pays (default 5)."
    ),
    p99_target_ms: float = typer.Option(None, "--p99-target-ms", help="Latency target the batcher plans for."),
    no_batching: bool = typer.Option(False, "--no-batching", help="Run every request alone."),
    max_queue_rows: int = typer.Option(None, "--max-queue-rows", help="Queue bound per model (default 1024)."),
    instances: int = typer.Option(
        None, "--instances", help="Batches run at once per model (default: one per core on a CPU, 1 on a GPU)."
    ),
    sessions: int = typer.Option(
        None, "--sessions", help="ONNX Runtime sessions the instances share (default: one per instance)."
    ),
    intra_op_threads: int = typer.Option(
        None, "--intra-op-threads", help="ONNX Runtime threads per session (default: cores / sessions)."
    ),
    max_request_bytes: int = typer.Option(None, "--max-request-bytes", help="Largest request body (413 above)."),
    max_rows_per_request: int = typer.Option(None, "--max-rows-per-request", help="Most rows in one request."),
    body_timeout_s: float = typer.Option(
        None, "--body-timeout-s", help="Longest pause while a request body arrives (408 after it; default 10)."
    ),
    overload_status: int = typer.Option(None, "--overload-status", help="503 (default, with Retry-After) or 429."),
    api_key: list[str] = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY` (repeatable)."),
    admin: bool = typer.Option(False, "--admin", help="Enable the repository load/unload endpoints."),
    admin_key: list[str] = typer.Option(None, "--admin-key", help="Key for the admin endpoints (repeatable)."),
    latest_versions: int = typer.Option(None, "--latest-versions", help="Serve the newest N versions (default 1)."),
    config: Path = typer.Option(None, "--config", help="TOML config file (\\[serve] table)."),
) -> None:
    """Serve every model of a repository over KServe V2 (HTTP and gRPC) until SIGTERM, then drain and exit 0."""
    from kiln.config import ServeSettings, resolve
    from kiln.serve import serve as run_server

    overrides: dict[str, Any] = {
        "host": host,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "models": tuple(m.strip() for m in models.split(",") if m.strip()) if models else None,
        "max_batch_size": max_batch_size,
        "max_queue_delay_ms": max_queue_delay_ms,
        "p99_target_ms": p99_target_ms,
        "batching": False if no_batching else None,
        "max_queue_rows": max_queue_rows,
        "instances": instances,
        "sessions": sessions,
        "intra_op_threads": intra_op_threads,
        "max_request_bytes": max_request_bytes,
        "max_rows_per_request": max_rows_per_request,
        "body_timeout_s": body_timeout_s,
        "overload_status": overload_status,
        "api_keys": tuple(api_key) if api_key else None,
        "admin_enabled": True if admin else None,
        "admin_keys": tuple(admin_key) if admin_key else None,
        "version_policy_latest": latest_versions,
    }
    settings = resolve(ServeSettings, overrides, config_file=config)
    logging.getLogger("kiln.serve").setLevel(min(logging.getLogger("kiln").getEffectiveLevel(), logging.INFO))
    err_console.print(
        f"[bold]kiln serve[/] {repository}: starting on http://{settings.host}:{settings.http_port}", highlight=False
    )
    run_server(repository, settings)
