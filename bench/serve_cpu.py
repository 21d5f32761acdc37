"""Where the CPU goes when `kiln serve` answers MiniLM requests: ONNX Runtime, the event loop, the load generator.

Starts `kiln serve` on a repository, drives it with open-loop Poisson load (one real English paragraph per
request) for ``--seconds`` at each ``--rates`` step, and reads CPU time from ``/proc`` before and after: per
thread of the server (the main thread runs the event loop; the others run ONNX Runtime) and for the load
generator's process. Prints CPU milliseconds per request and writes JSON. Linux only.

    python bench/serve_cpu.py --repo /tmp/kb --rates 100,200
    python bench/serve_cpu.py --repo /tmp/kb --rates 200 --no-batching
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console
from rich.table import Table

from kiln import artifact as artifacts
from kiln.bench import LoadClient, LoadSettings
from kiln.bench.load import payloads_for
from kiln.bench.loadtarget import V2Target
from kiln.serve import ServerProcess

HERE = Path(__file__).resolve().parent
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
console = Console(width=120)


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid``."""
    seconds: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) * TICK_S
    return seconds


def process_cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="A repository holding minilm (its v1 is served).")
    parser.add_argument("--rates", default="100,200")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_cpu.json")
    args = parser.parse_args()
    fp32 = artifacts.load(args.repo / "minilm", artifacts.versions(args.repo / "minilm")[0])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(fp32.path, repo / "minilm" / str(fp32.version))
        flags = ["--models", "minilm"] + (["--no-batching"] if args.no_batching else [])
        with ServerProcess(repo, *flags) as server:
            target = V2Target(server.url, "minilm")
            payloads, _ = payloads_for(target.metadata(), LoadSettings(texts_per_request=1, concurrency=64))
            with LoadClient(target, payloads, warmup_requests=16) as client:
                assert server.pid is not None and client.pid is not None
                for rate in (float(r) for r in args.rates.split(",")):
                    before, client_before = thread_cpu_s(server.pid), process_cpu_s(client.pid)
                    step = client.open_loop(
                        rate,
                        duration_s=args.seconds,
                        max_requests=int(rate * args.seconds * 2),
                        max_outstanding=64,
                        seed=1,
                    )
                    after, client_after = thread_cpu_s(server.pid), process_cpu_s(client.pid)
                    done = max(1, step.ok)
                    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
                    event_loop = used.get(server.pid, 0.0)
                    workers = sum(v for tid, v in used.items() if tid != server.pid)
                    rows.append(
                        {
                            "rate_rps": rate,
                            "achieved_rps": step.achieved_rps,
                            "p99_ms": step.p99_ms,
                            "requests": step.ok,
                            "ms_per_request": {
                                "other_threads_onnxruntime": workers / done * 1e3,
                                "event_loop": event_loop / done * 1e3,
                                "load_generator": (client_after - client_before) / done * 1e3,
                            },
                        }
                    )
    table = Table(title=f"CPU ms per request, kiln serve, batching {'off' if args.no_batching else 'on'}")
    for column in ("rate", "achieved", "P99 ms", "ORT threads", "event loop", "load generator"):
        table.add_column(column, justify="right")
    for row in rows:
        ms = row["ms_per_request"]
        table.add_row(
            f"{row['rate_rps']:g}",
            f"{row['achieved_rps']:.1f}",
            f"{row['p99_ms']:.0f}",
            f"{ms['other_threads_onnxruntime']:.2f}",
            f"{ms['event_loop']:.2f}",
            f"{ms['load_generator']:.2f}",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"batching": not args.no_batching, "steps": rows, "created_at": time.time()}, indent=2)
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
