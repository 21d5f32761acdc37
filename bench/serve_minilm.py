"""Bar of issue 3: `kiln serve` against in-process ONNX Runtime and a plain FastAPI server, same FP32 MiniLM.

One run, one machine, real English text (paragraphs of Python's ``pydoc_data.topics``, one per request), open-loop
Poisson load from a generator in its own process, latency from the scheduled send time. The in-process figures and
the load use the same paragraphs (all of them unless ``--texts`` says how many), because sorted-32's throughput
depends on the set it sorts: on the first 512 it was 0.91x its throughput on all 2331 (an ad-hoc run, 2026-12-07).

  (a) in-process ONNX Runtime (Kiln's TextEncoder): sentences/s with length-sorted batches of 32, at batch 1,
      and with batches of 32 in arrival order
  (b) the FastAPI + uvicorn + ORT baseline (bench/serve_fastapi_baseline.py, no batching): the highest Poisson
      rate with P99 <= 200 ms and < 1% errors
  (c) `kiln serve`, the same figure with batching on (its default) and off; then, with both servers up, P99 on
      and off at common rates below saturation, steps interleaved on the same arrival schedule ("batching never
      hurts": P99 on <= 1.1 x P99 off), each ratio with a 90% paired-bootstrap interval over the rounds, and
      how many requests batching on put in a batch over those rounds (1.0: it ran exactly as off did)
  (d) with --variant: `kiln serve` on the repository's optimized MiniLM version, and its ratio to FP32
  (e) start-to-ready of `kiln serve` (process start until GET /v2/health/ready answers 200)

The highest rate is found by geometric steps from half the in-process rate, then bisection; every step is
bounded in time and requests. The best rate is then re-run ``--confirm`` times and must pass a majority of its
steps (else the next lower passing rate is tried), so one lucky step near saturation does not name the figure.

    python bench/serve_minilm.py                      # exports FP32 MiniLM into a temp repository first
    python bench/serve_minilm.py --repo kiln-repo --variant   # minilm v1 = FP32, latest version = the variant
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from kiln import artifact as artifacts
from kiln._utils import package_versions, percentile
from kiln.bench import LoadClient, LoadReport, LoadSettings, search_max_rate, write_load_html
from kiln.bench.load import RateSearch, payloads_for
from kiln.bench.loadresults import LoadStep
from kiln.bench.loadtarget import V2Target, probe, wait_ready
from kiln.data import english_corpus
from kiln.runtime import OrtEngine, text_encoder_for
from kiln.runtime import probe as probe_hardware
from kiln.serve import free_port, free_ports

HERE = Path(__file__).resolve().parent
BASELINE_SCRIPT = HERE / "serve_fastapi_baseline.py"
MODEL = "minilm"
console = Console(width=150)


@dataclass
class Options:
    texts: int | None
    repeats: int
    step_s: float
    grid_s: float
    grid_rounds: int
    p99_ms: float
    max_error_rate: float
    concurrency: int
    binary: bool
    grid: tuple[float, ...]
    confirm: int = 2
    refine_steps: int = 5
    confirm_refine_steps: int = 2


@dataclass
class ServerRun:
    """One server process: how long it took to be ready, its load steps, and how it exited."""

    name: str
    start_to_ready_s: float
    steps: list[LoadStep] = field(default_factory=list)
    exit_code: int | None = None


# --- preparing the model -----------------------------------------------------------------------------------------


def prepare(
    repo: Path | None, workdir: Path, want_variant: bool
) -> tuple[artifacts.Artifact, artifacts.Artifact | None]:
    """The FP32 MiniLM artifact, and the optimized variant when asked for and present."""
    if repo is not None and artifacts.versions(repo / MODEL):
        found = artifacts.versions(repo / MODEL)
        fp32 = artifacts.load(repo / MODEL, found[0])
        variant = artifacts.load(repo / MODEL, found[-1]) if want_variant and len(found) > 1 else None
        return fp32, variant
    from kiln.export import bundled_minilm_path, export

    console.print("exporting FP32 MiniLM from the bundled package ...")
    return export(bundled_minilm_path(), out=workdir / "export", name=MODEL), None


def single_version_repo(art: artifacts.Artifact, root: Path) -> Path:
    """A repository holding only ``art`` (hard links where possible), so `kiln serve` serves exactly it."""
    target = root / MODEL / str(art.version)

    def link_or_copy(src: str, dst: str) -> object:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            return shutil.copy2(src, dst)

    shutil.copytree(art.path, target, copy_function=link_or_copy)
    config = art.path.parent / "config.pbtxt"
    if config.is_file():
        shutil.copy2(config, root / MODEL / "config.pbtxt")
    return root


# --- (a) in-process ----------------------------------------------------------------------------------------------


def in_process(art: artifacts.Artifact, texts: list[str], repeats: int) -> dict[str, float]:
    """Sentences/s of Kiln's TextEncoder on ORT: sorted batches of 32 and batch 1 interleaved, medians of repeats."""
    encoder = text_encoder_for(art, OrtEngine(art.model_path, name="in-process"))
    runs: dict[str, Callable[[], Any]] = {
        "sorted_batch32_sps": lambda: encoder.encode(texts, 32),
        "batch1_sps": lambda: encoder.encode(texts, 1),
    }
    encoder.encode(texts[:64], 32)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    encoder.encode(texts, 32, sort_by_length=False)  # one pass: it only shows what padding costs
    arrival = time.perf_counter() - start
    figures = {name: len(texts) / statistics.median(values) for name, values in seconds.items()}
    return figures | {"arrival_order_batch32_sps": len(texts) / arrival}


# --- servers -----------------------------------------------------------------------------------------------------


@contextmanager
def server(name: str, command: list[str], port: int, log_dir: Path) -> Iterator[tuple[str, ServerRun]]:
    """Start a server, time it to ready, yield its URL; SIGTERM it afterwards and record its exit code."""
    log = log_dir / f"{name.replace(' ', '_')}.log"
    url = f"http://127.0.0.1:{port}"
    run = ServerRun(name, float("nan"))
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        # something answers there already: its answers would be taken for this server's
        raise SystemExit(f"{name}: port {port} is already taken by another process; run the bench again")
    with log.open("wb") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(url, timeout_s=120.0, poll_s=0.01)
            except Exception:
                sys.stderr.write(log.read_text(errors="replace")[-4000:])
                raise
            run.start_to_ready_s = time.perf_counter() - started
            console.print(f"[bold]{name}[/]: ready in {run.start_to_ready_s:.2f} s")
            yield url, run
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                run.exit_code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                run.exit_code = process.wait()
            if run.exit_code not in (0, -signal.SIGTERM):  # uvicorn re-raises SIGTERM after its graceful shutdown
                console.print(
                    f"[red]{name} exited with {run.exit_code}[/]; its log: {log.read_text(errors='replace')[-2000:]}"
                )


def kiln_command(repo: Path, port: int, *, batching: bool) -> list[str]:
    command = [sys.executable, "-m", "kiln", "serve", str(repo), "--host", "127.0.0.1", "--http-port", str(port)]
    command += ["--grpc-port", "0", "--models", MODEL, "--max-batch-size", "32", "--max-queue-delay-ms", "5"]
    command += ["--p99-target-ms", "200"]
    return command + ([] if batching else ["--no-batching"])


def baseline_command(art: artifacts.Artifact, port: int) -> list[str]:
    return [sys.executable, str(BASELINE_SCRIPT), str(art.path), "--port", str(port)]


def client_for(url: str, options: Options) -> LoadClient:
    target = V2Target(url, MODEL)
    settings = LoadSettings(binary=options.binary, texts_per_request=1, concurrency=options.concurrency)
    payloads, _ = payloads_for(target.metadata(), settings)  # one per paragraph, in the corpus's order
    # NOTE: the texts of the in-process figures, no others: sorted-32's throughput depends on the set it sorts
    payloads = payloads[: options.texts]
    probe(target, payloads[0])
    return LoadClient(target, payloads, timeout_s=10.0, warmup_requests=16)


def find_max(client: LoadClient, start_rps: float, options: Options, label: str) -> RateSearch:
    def show(step: LoadStep) -> None:
        errors = f", errors {step.errors}" if step.errors else ""
        p99 = f"{step.p99_ms:.0f} ms" if step.p99_ms is not None else "-"
        console.print(f"  {label}: {step.rate_rps:6.1f} req/s -> {step.achieved_rps:6.1f} ok/s, P99 {p99}{errors}")

    return search_max_rate(
        client,
        start_rps=start_rps,
        p99_ms=options.p99_ms,
        max_error_rate=options.max_error_rate,
        growth=1.3,
        refine_steps=options.refine_steps,
        duration_s=options.step_s,
        max_outstanding=options.concurrency,
        confirm=options.confirm,
        confirm_refine_steps=options.confirm_refine_steps,
        progress=show,
    )


def run_grid(
    on: LoadClient, off: LoadClient, rates: list[float], options: Options
) -> tuple[list[list[LoadStep]], list[list[LoadStep]]]:
    """``grid_rounds`` rounds of every rate on both servers, on the same arrival schedule, in alternating order
    (on/off, then off/on ...) so that drift favours neither. Returns the steps per rate, for on and for off."""
    results: dict[int, list[list[LoadStep]]] = {0: [[] for _ in rates], 1: [[] for _ in rates]}
    for round_ in range(options.grid_rounds):
        for i, rate in enumerate(rates):
            order = ((0, on), (1, off)) if (i + round_) % 2 == 0 else ((1, off), (0, on))
            for which, client in order:
                time.sleep(1.0)
                max_requests = int(rate * options.grid_s * 1.5) + 10
                step = client.open_loop(
                    rate,
                    duration_s=options.grid_s,
                    max_requests=max_requests,
                    max_outstanding=options.concurrency,
                    seed=100 * (round_ + 1) + i,
                )
                results[which][i].append(step)
    return results[0], results[1]


def median_round_p99_ms(steps: list[LoadStep]) -> float | None:
    """The median over steps of each step's P99 (None when no step had a successful request)."""
    values = [s.p99_ms for s in steps if s.p99_ms is not None]
    return statistics.median(values) if values else None


def pooled_p99_ms(steps: list[LoadStep]) -> float | None:
    """P99 over the successful requests of several steps together (more samples than any one of them)."""
    latencies = [float(v) for step in steps for v in _ok_latencies_ms(step)]
    return percentile(latencies, 99) if latencies else None


def _ok_latencies_ms(step: LoadStep) -> np.ndarray[Any, Any]:
    """The latencies of a step's successful requests, in milliseconds."""
    assert step.samples is not None
    return np.asarray(step.samples.latency_s[step.samples.outcome == 200], dtype=np.float64) * 1e3


def p99_ratio_interval(
    on_steps: list[LoadStep], off_steps: list[LoadStep], draws: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """A 90% paired-bootstrap interval of pooled P99 on / pooled P99 off.

    Round ``k`` of both servers ran the same arrival schedule, so rounds are drawn with replacement as pairs
    and the ratio recomputed ``draws`` times. An interval that holds 1.0 says the two P99s are not told apart
    by this many rounds on this machine.
    """
    pairs = [
        (_ok_latencies_ms(on), _ok_latencies_ms(off))
        for on, off in zip(on_steps, off_steps, strict=True)
        if on.samples is not None and off.samples is not None
    ]
    pairs = [(a, b) for a, b in pairs if a.size and b.size]
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(draws)
    for d in range(draws):
        picked = rng.integers(0, len(pairs), len(pairs))
        on = np.concatenate([pairs[k][0] for k in picked])
        off = np.concatenate([pairs[k][1] for k in picked])
        ratios[d] = np.percentile(on, 99) / np.percentile(off, 99)
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


def batch_counts(url: str) -> tuple[float, float]:
    """(requests through the batcher, batches executed) so far, from the server's ``/metrics``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"kiln_queue_duration_seconds": 0.0, "kiln_batch_size_rows": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in totals:
            totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_count"))
    return totals["kiln_queue_duration_seconds"], totals["kiln_batch_size_rows"]


# --- the run -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None, help="Reuse REPO/minilm (v1 = FP32).")
    parser.add_argument("--variant", action="store_true", help="Also serve REPO/minilm's latest version.")
    parser.add_argument(
        "--texts",
        type=int,
        default=None,
        help="Paragraphs, the first N of the corpus, for the in-process figures and the load alike (default: all).",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=8.0, help="Seconds per step of the rate search.")
    parser.add_argument("--grid-s", type=float, default=8.0, help="Seconds per step of the on/off comparison.")
    parser.add_argument("--grid-rounds", type=int, default=6, help="Rounds of the on/off comparison.")
    parser.add_argument("--p99-ms", type=float, default=200.0)
    parser.add_argument(
        "--confirm", type=int, default=2, help="Re-runs of the best rate; it must pass a majority of its steps."
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=5,
        help="Bisections of the bracket where the rate search passes, then fails (x1.3): 5 leave 0.8%%, 3 left 3.3%%.",
    )
    parser.add_argument(
        "--confirm-refine-steps",
        type=int,
        default=2,
        help="Bisections between the confirmed rate and the lowest failed one above it, each confirmed likewise.",
    )
    parser.add_argument("--max-error-rate", type=float, default=0.01)
    parser.add_argument("--concurrency", type=int, default=64, help="Cap on requests in flight.")
    parser.add_argument("--binary", action="store_true", help="Binary tensor extension instead of JSON.")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_minilm.json")
    parser.add_argument("--report-dir", type=Path, default=None, help="Also write an HTML report with the curves.")
    args = parser.parse_args()
    options = Options(
        args.texts,
        args.repeats,
        args.step_s,
        args.grid_s,
        args.grid_rounds,
        args.p99_ms,
        args.max_error_rate,
        args.concurrency,
        args.binary,
        (0.25, 0.5, 0.75, 0.9),
        args.confirm,
        args.refine_steps,
        args.confirm_refine_steps,
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-serve-bench-") as tmp:
        workdir = Path(tmp)
        fp32, variant = prepare(args.repo, workdir, args.variant)
        if args.variant and variant is None:
            console.print("[yellow]--variant: the repository has no optimized MiniLM version; (d) is skipped[/]")
        texts = english_corpus(args.texts)
        console.print(f"(a) in-process ORT on {len(texts)} texts ...")
        inproc = in_process(fp32, texts, args.repeats)
        console.print("    " + ", ".join(f"{k} {v:.1f}" for k, v in inproc.items()))
        fp32_repo = single_version_repo(fp32, workdir / "serve-fp32")
        start = inproc["sorted_batch32_sps"] / 2
        runs: dict[str, ServerRun] = {}
        searches: dict[str, RateSearch] = {}

        def search_server(name: str, command: list[str], port: int, start_rps: float) -> None:
            with server(name, command, port, workdir) as (url, run), client_for(url, options) as client:
                searches[name] = find_max(client, start_rps, options, name)
                run.steps.extend(searches[name].steps)
            runs[name] = run

        port = free_port()
        search_server("fastapi baseline", baseline_command(fp32, port), port, start)
        # Both kiln servers stay up (the idle one costs nothing), so their P99s can be compared interleaved.
        on_port, off_port = free_ports(2)
        with (
            server("kiln batching on", kiln_command(fp32_repo, on_port, batching=True), on_port, workdir) as on,
            server("kiln batching off", kiln_command(fp32_repo, off_port, batching=False), off_port, workdir) as off,
            client_for(on[0], options) as on_client,
            client_for(off[0], options) as off_client,
        ):
            for name, client, run, begin in (
                ("kiln batching off", off_client, off[1], start),
                ("kiln batching on", on_client, on[1], None),
            ):
                begin = begin or searches["kiln batching off"].rate_rps or start
                searches[name] = find_max(client, begin, options, name)
                run.steps.extend(searches[name].steps)
            on_max = searches["kiln batching on"].rate_rps or start
            off_max = searches["kiln batching off"].rate_rps or start
            grid_rates = [round(f * min(on_max, off_max), 1) for f in options.grid]
            console.print(f"  batching on and off, interleaved, at {grid_rates} req/s ...")
            before = batch_counts(on[0])
            grid_on, grid_off = run_grid(on_client, off_client, grid_rates, options)
            after = batch_counts(on[0])
            requests, batches = (b - a for a, b in zip(before, after, strict=True))
            grid_requests_per_batch = requests / batches if batches else None
            on[1].steps.extend(step for steps in grid_on for step in steps)
            off[1].steps.extend(step for steps in grid_off for step in steps)
        runs["kiln batching on"], runs["kiln batching off"] = on[1], off[1]
        if variant is not None:
            variant_repo = single_version_repo(variant, workdir / "serve-variant")
            port = free_port()
            search_server(
                f"kiln variant v{variant.version}", kiln_command(variant_repo, port, batching=True), port, on_max
            )
        result = summarize(fp32, variant, texts, inproc, runs, searches, grid_rates, grid_on, grid_off, options)
        result["batching_never_hurts"]["on_requests_per_batch"] = grid_requests_per_batch
        result["wall_s"] = time.perf_counter() - began
        print_table(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
        if args.report_dir is not None:
            reports = [
                LoadReport(url="", model=MODEL, label=name, steps=run.steps, payload=result["payload"])
                for name, run in runs.items()
            ]
            console.print(
                f"report: {write_load_html(reports, args.report_dir, title='MiniLM under load', p99_ms=args.p99_ms)}"
            )


def summarize(
    fp32: artifacts.Artifact,
    variant: artifacts.Artifact | None,
    texts: list[str],
    inproc: dict[str, float],
    runs: dict[str, ServerRun],
    searches: dict[str, RateSearch],
    grid_rates: list[float],
    grid_on: list[list[LoadStep]],
    grid_off: list[list[LoadStep]],
    options: Options,
) -> dict[str, Any]:
    def best(name: str) -> float | None:
        return searches[name].rate_rps if name in searches else None

    kiln_on, kiln_off, baseline = best("kiln batching on"), best("kiln batching off"), best("fastapi baseline")
    kiln = kiln_on or 0.0  # the server's figure is its default setting: batching on
    variant_name = f"kiln variant v{variant.version}" if variant is not None else None
    variant_rate = best(variant_name) if variant_name else None
    pairs: list[dict[str, Any]] = []
    for rate, on_steps, off_steps in zip(grid_rates, grid_on, grid_off, strict=True):
        on, off = pooled_p99_ms(on_steps), pooled_p99_ms(off_steps)
        # the median over rounds of each round's P99: one round that the machine stalled moves it less
        on_median, off_median = median_round_p99_ms(on_steps), median_round_p99_ms(off_steps)
        pairs.append(
            {
                "rate_rps": rate,
                "p99_on_ms": on,
                "p99_off_ms": off,
                "on_over_off": on / off if on and off else None,
                "median_round_p99_on_ms": on_median,
                "median_round_p99_off_ms": off_median,
                "median_round_on_over_off": on_median / off_median if on_median and off_median else None,
                "on_over_off_90ci": p99_ratio_interval(on_steps, off_steps),
                "p99_on_per_round_ms": [s.p99_ms for s in on_steps],
                "p99_off_per_round_ms": [s.p99_ms for s in off_steps],
                "errors_on": sum(sum(s.errors.values()) for s in on_steps),
                "errors_off": sum(sum(s.errors.values()) for s in off_steps),
            }
        )
    ratios = [float(p["on_over_off"]) for p in pairs if p["on_over_off"] is not None]
    words = sorted(len(t.split()) for t in texts)
    start_to_ready = runs["kiln batching on"].start_to_ready_s  # started first, alone
    return {
        "benchmark": "serve_minilm",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"fp32": fp32.ref(), "variant": variant.ref() if variant else None},
        "payload": {
            "kind": "text",
            "texts_per_request": 1,
            "binary": options.binary,
            "median_words": words[len(words) // 2],
        },
        "bar": {
            "p99_ms": options.p99_ms,
            "max_error_rate": options.max_error_rate,
            "step_s": options.step_s,
            "confirm": options.confirm,
            "refine_steps": options.refine_steps,
            "confirm_refine_steps": options.confirm_refine_steps,
        },
        "in_process": inproc,
        "max_rate_rps": {
            "fastapi_baseline": baseline,
            "kiln_batching_on": kiln_on,
            "kiln_batching_off": kiln_off,
            "kiln": kiln,
            "kiln_variant": variant_rate,
        },
        "ratios": {
            "kiln_over_in_process_sorted32": kiln / inproc["sorted_batch32_sps"],
            "kiln_over_baseline": kiln / baseline if baseline else None,
            "kiln_off_over_in_process_sorted32": (kiln_off or 0.0) / inproc["sorted_batch32_sps"],
            "kiln_off_over_baseline": (kiln_off or 0.0) / baseline if baseline else None,
            "variant_over_fp32": variant_rate / kiln_on if variant_rate and kiln_on else None,
        },
        "batching_never_hurts": {
            "pairs": pairs,
            "max_on_over_off": max(ratios) if ratios else None,
            "grid_s": options.grid_s,
            "grid_rounds": options.grid_rounds,
            "p99": "pooled over the rounds",
        },
        "start_to_ready_s": start_to_ready,
        "bars": {
            "kiln >= 0.85x in-process (sorted 32)": kiln >= 0.85 * inproc["sorted_batch32_sps"],
            "kiln >= 1.5x fastapi baseline": bool(baseline) and kiln >= 1.5 * (baseline or 0.0),
            "batching on P99 <= 1.1x off at every rate": bool(ratios) and max(ratios) <= 1.1,
            "start to ready <= 3 s": start_to_ready <= 3.0,
            "kiln serve exits 0 on SIGTERM": all(
                run.exit_code == 0 for name, run in runs.items() if name.startswith("kiln")
            ),
        },
        "servers": {
            name: {
                "start_to_ready_s": run.start_to_ready_s,
                "exit_code": run.exit_code,
                "steps": [s.to_dict() for s in run.steps],
            }
            for name, run in runs.items()
        },
        "hardware": probe_hardware(),
        "versions": package_versions("kiln", "onnxruntime", "numpy", "httptools", "fastapi", "uvicorn", "starlette"),
    }


def print_table(result: dict[str, Any]) -> None:
    inproc, rates, ratios = result["in_process"], result["max_rate_rps"], result["ratios"]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}x"

    table = Table(
        title=f"MiniLM FP32, 1 real English text per request, P99 <= {result['bar']['p99_ms']:g} ms, < 1% errors"
    )
    table.add_column("what")
    table.add_column("sentences/s", justify="right")
    table.add_column("vs in-process", justify="right")
    sorted32 = inproc["sorted_batch32_sps"]
    rows = [
        ("in-process ORT, length-sorted batches of 32", sorted32),
        ("in-process ORT, batch 1", inproc["batch1_sps"]),
        ("in-process ORT, batches of 32 in arrival order", inproc["arrival_order_batch32_sps"]),
        ("FastAPI + ORT, no batching (highest Poisson rate)", rates["fastapi_baseline"]),
        ("kiln serve, batching on", rates["kiln_batching_on"]),
        ("kiln serve, batching off", rates["kiln_batching_off"]),
        ("kiln serve, optimized variant", rates["kiln_variant"]),
    ]
    for name, value in rows:
        table.add_row(name, fmt(value), "-" if value is None else f"{value / sorted32:.2f}x")
    console.print(table)
    pairs = result["batching_never_hurts"]["pairs"]
    console.print(
        "P99 on/off (ms) at "
        + ", ".join(f"{p['rate_rps']:g}/s: {fmt(p['p99_on_ms'])}/{fmt(p['p99_off_ms'])}" for p in pairs)
    )
    console.print(
        "median over rounds of each round's P99, on/off: "
        + ", ".join(
            "-" if p["median_round_on_over_off"] is None else f"{p['median_round_on_over_off']:.2f}" for p in pairs
        )
    )
    never_hurts = result["batching_never_hurts"]
    per_batch = never_hurts.get("on_requests_per_batch")
    console.print(
        "pooled P99 on/off with its 90% paired-bootstrap interval over rounds: "
        + ", ".join(
            f"{p['rate_rps']:g}/s {p['on_over_off']:.2f} [{low:.2f}, {high:.2f}]"
            for p in pairs
            if p["on_over_off"] is not None and p["on_over_off_90ci"] is not None
            for low, high in [p["on_over_off_90ci"]]
        )
        + ("" if per_batch is None else f"; batching on ran {per_batch:.3f} requests per batch over these rounds")
    )
    console.print(
        f"kiln / in-process {ratio(ratios['kiln_over_in_process_sorted32'])}, kiln / baseline "
        f"{ratio(ratios['kiln_over_baseline'])}, variant / fp32 {ratio(ratios['variant_over_fp32'])}, "
        f"start to ready {result['start_to_ready_s']:.2f} s"
    )
    for bar, held in result["bars"].items():
        console.print(f"  {'[green]held[/]' if held else '[red]missed[/]'}: {bar}")
    hardware = result["hardware"]
    console.print(f"hardware: {hardware['cpu']}, {hardware['usable_cores']} cores; {result['versions']}")


if __name__ == "__main__":
    main()
