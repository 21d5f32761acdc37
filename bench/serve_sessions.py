"""One ONNX Runtime session shared by the server's instances, or one session per instance: which serves better?

`kiln serve` runs one batch at a time per core (``--instances``, default one per core on a CPU). Those instances
can run on a single-threaded session each (``--sessions 2`` on two cores, the default), or on one shared session
whose thread pool spans every core (``--sessions 1``). Same FP32 MiniLM, real English paragraphs:

  (a) in-process: sentences/s with two callers, each running one paragraph at a time (the server's instances
      under load), and the latency of one paragraph running alone (the server below saturation), for short
      (30-40 tokens) and long (200+ tokens) paragraphs; configurations interleaved, medians over rounds
  (b) two `kiln serve` processes, one each way (batching on, everything else equal), under open-loop Poisson load
      at the same rates, steps interleaved in alternating order on the same arrival schedule: pooled P99 per
      rate, with a 90% paired-bootstrap interval of the ratio, and the requests answered per second

    python bench/serve_sessions.py --repo /tmp/kb      # minilm v1 = FP32 (kiln export minilm --out /tmp/kb)
    python bench/serve_sessions.py --rates 40,80,100,115 --grid-rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_minilm's helpers: one way to run a server

from serve_minilm import (
    Options,
    client_for,
    kiln_command,
    p99_ratio_interval,
    pooled_p99_ms,
    prepare,
    run_grid,
    server,
    single_version_repo,
)

from kiln import artifact as artifacts
from kiln._utils import write_result
from kiln.data import english_corpus
from kiln.runtime import OrtEngine, TextTokenizer, default_intra_op_threads, tokenizer_for
from kiln.serve import free_ports
from kiln.types import Feeds

console = Console(width=150)


def layouts(art: artifacts.Artifact, cores: int) -> dict[str, list[OrtEngine]]:
    """The engines each instance runs on: one shared session with ``cores`` threads, or one 1-thread session each."""
    shared = OrtEngine(art.model_path, intra_op_threads=cores, allow_spinning=False)
    return {
        "1 shared session": [shared] * cores,
        f"{cores} sessions": [
            OrtEngine(art.model_path, intra_op_threads=1, allow_spinning=False) for _ in range(cores)
        ],
    }


def concurrent_sps(engines: list[OrtEngine], feeds: list[Feeds]) -> float:
    """Paragraphs/s with one caller per engine, each taking the next paragraph as soon as it is done."""
    lock, next_index = threading.Lock(), iter(range(len(feeds)))

    def caller(engine: OrtEngine) -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            engine.run(feeds[i])

    threads = [threading.Thread(target=caller, args=(engine,)) for engine in engines]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(feeds) / (time.perf_counter() - started)


def alone_ms(engine: OrtEngine, feeds: list[Feeds]) -> float:
    started = time.perf_counter()
    for f in feeds:
        engine.run(f)
    return (time.perf_counter() - started) / len(feeds) * 1e3


def in_process(art: artifacts.Artifact, texts: int, rounds: int, cores: int) -> dict[str, dict[str, float]]:
    tokenizer = tokenizer_for(art)
    assert tokenizer is not None
    ids = tokenizer.encode(english_corpus(texts))
    engines = layouts(art, cores)
    names = [spec.name for spec in next(iter(engines.values()))[0].inputs]
    feeds = [TextTokenizer.pad([row], names) for row in ids]
    short = [f for f, row in zip(feeds, ids, strict=True) if 30 <= len(row) <= 40][:24]
    long = [f for f, row in zip(feeds, ids, strict=True) if len(row) >= 200][:6]
    if not short or not long:
        raise SystemExit(f"--texts {texts} holds no short (30-40 tokens) or no long (200+) paragraph; pass more")
    for pool in engines.values():  # warm-up
        concurrent_sps(pool, feeds[:64])
    samples: dict[str, dict[str, list[float]]] = {name: {"sps": [], "short": [], "long": []} for name in engines}
    for _ in range(rounds):
        for name, pool in engines.items():
            samples[name]["sps"].append(concurrent_sps(pool, feeds))
            samples[name]["short"].append(alone_ms(pool[0], short))
            samples[name]["long"].append(alone_ms(pool[0], long))
    return {
        name: {
            "concurrent_sps": statistics.median(s["sps"]),
            "alone_short_ms": statistics.median(s["short"]),
            "alone_long_ms": statistics.median(s["long"]),
        }
        for name, s in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None, help="Reuse REPO/minilm (v1 = FP32).")
    parser.add_argument("--texts", type=int, default=400, help="Paragraphs for the in-process figures.")
    parser.add_argument("--rounds", type=int, default=3, help="In-process rounds.")
    parser.add_argument("--rates", default="40,70,90,105", help="Offered requests/s of the server grid.")
    parser.add_argument("--grid-s", type=float, default=8.0)
    parser.add_argument("--grid-rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_sessions.json"))
    args = parser.parse_args()
    cores = default_intra_op_threads()
    if cores < 2:
        raise SystemExit("this comparison needs at least two usable cores")
    rates = [float(r) for r in args.rates.split(",")]
    options = Options(
        texts=args.texts,
        repeats=1,
        step_s=args.grid_s,
        grid_s=args.grid_s,
        grid_rounds=args.grid_rounds,
        p99_ms=200.0,
        max_error_rate=0.01,
        concurrency=args.concurrency,
        binary=False,
        grid=(),
    )
    with tempfile.TemporaryDirectory(prefix="kiln-sessions-") as tmp:
        workdir = Path(tmp)
        fp32, _ = prepare(args.repo, workdir, False)
        console.print(f"(a) in-process, {cores} callers ...")
        inproc = in_process(fp32, args.texts, args.rounds, cores)
        repo = single_version_repo(fp32, workdir / "serve")
        console.print("(b) kiln serve, --sessions 1 against --sessions", cores, "...")
        shared_port, split_port = free_ports(2)
        shared_cmd = [*kiln_command(repo, shared_port, batching=True), "--sessions", "1"]
        split_cmd = [*kiln_command(repo, split_port, batching=True), "--sessions", str(cores)]
        with (
            server("kiln --sessions 1", shared_cmd, shared_port, workdir) as shared,
            server(f"kiln --sessions {cores}", split_cmd, split_port, workdir) as split,
            client_for(shared[0], options) as shared_client,
            client_for(split[0], options) as split_client,
        ):
            grid_shared, grid_split = run_grid(shared_client, split_client, rates, options)

    grid: list[dict[str, Any]] = []
    for rate, a, b in zip(rates, grid_shared, grid_split, strict=True):
        p99_a, p99_b = pooled_p99_ms(a), pooled_p99_ms(b)
        grid.append(
            {
                "rate_rps": rate,
                "shared_p99_ms": p99_a,
                "split_p99_ms": p99_b,
                "ratio": p99_a / p99_b if p99_a and p99_b else None,
                "ratio_90ci": p99_ratio_interval(a, b),
                "shared_ok_rps": statistics.median(s.achieved_rps for s in a),
                "split_ok_rps": statistics.median(s.achieved_rps for s in b),
                "shared_errors": sum(sum(s.errors.values()) for s in a),
                "split_errors": sum(sum(s.errors.values()) for s in b),
            }
        )

    table = Table(title=f"MiniLM FP32 on {cores} cores: {cores} instances on one shared session, or a session each")
    for column in ("", *inproc):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(f"in-process, {cores} callers: sentences/s", *(f"{v['concurrent_sps']:.1f}" for v in inproc.values()))
    table.add_row("alone: short paragraph ms", *(f"{v['alone_short_ms']:.1f}" for v in inproc.values()))
    table.add_row("alone: long paragraph ms", *(f"{v['alone_long_ms']:.1f}" for v in inproc.values()))
    console.print(table)
    served = Table(title="kiln serve under open-loop Poisson load (pooled over rounds)")
    for column in ("offered req/s", "P99 shared ms", f"P99 {cores} sessions ms", "ratio [90% CI]", "ok/s", "errors"):
        served.add_column(column, justify="right")
    for row in grid:
        ci = row["ratio_90ci"]
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
        served.add_row(
            f"{row['rate_rps']:.0f}",
            f"{row['shared_p99_ms']:.0f}" if row["shared_p99_ms"] else "-",
            f"{row['split_p99_ms']:.0f}" if row["split_p99_ms"] else "-",
            f"{ratio} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ratio,
            f"{row['shared_ok_rps']:.1f} / {row['split_ok_rps']:.1f}",
            f"{row['shared_errors']} / {row['split_errors']}",
        )
    console.print(served)
    write_result(
        args.json,
        {"settings": vars(args) | {"json": str(args.json), "cores": cores}, "in_process": inproc, "grid": grid},
        ("onnxruntime", "kiln"),
    )
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
