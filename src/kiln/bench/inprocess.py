"""``kiln bench``: the same inputs through several engines and variants, interleaved, on this machine."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln._utils import package_versions
from kiln.artifact import Artifact
from kiln.artifact import load as load_artifact
from kiln.bench.engines import (
    Candidate,
    build_candidates,
    check_batch_sizes,
    check_comparable,
    is_text,
    make_request,
    request_windows,
)
from kiln.bench.measure import CORPUS_PASSES, corpus_passes, fidelity_of, latency_figures, time_round_robin
from kiln.bench.results import BenchReport, BenchRow, CorpusThroughput
from kiln.config import BenchSettings, check_settings_object, resolve, settings_dict
from kiln.data import EvalSet, as_eval_set, check_eval_fits, eval_set
from kiln.errors import ConfigError, InvalidInput
from kiln.fidelity import label_output, task_score
from kiln.runtime import probe

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
VERSIONED_PACKAGES = ("kiln", "onnxruntime", "torch", "numpy", "onnx")


def bench(
    models: Sequence[Artifact | Path | str] | Artifact | Path | str,
    *,
    settings: BenchSettings | None = None,
    include_source: bool | None = None,
    report_dir: Path | None = None,
    progress: Progress | None = None,
    eval_data: EvalSet | tuple[Any, ...] | None = None,
) -> BenchReport:
    """Compare artifacts (or their model or version directories; and the PyTorch model they came from) on the same
    held-out inputs.

    Every artifact runs under ONNX Runtime; with ``include_source`` (default: ``settings.include_torch``) the
    source PyTorch model of ``artifacts[0]`` runs too, when it can be rebuilt. For each batch size the engines are
    warmed up, then timed round-robin on real requests of that many rows; fidelity is measured against
    ``artifacts[0]`` on the whole evaluation set. With ``report_dir`` (default: ``settings.report_dir``) an HTML
    report and ``bench.json`` are written there. ``eval_data`` (``kiln.data.load_eval_npz``) replaces the held-out
    set the first artifact was exported with (a model exported without one has none).

    Raises:
        InvalidInput: no artifacts, or artifacts that do not share one input signature; no held-out data.
        ConfigError: settings outside their rules (no batch sizes, runs < 1 ...).

    Example:
        >>> report = bench([load("kiln-repo/minilm/1"), load("kiln-repo/minilm/2")])  # doctest: +SKIP
        >>> report.row("minilm v2 (int8-dynamic)", 32).rows_per_s  # doctest: +SKIP
        812.4
    """
    settings = check_settings_object(settings, BenchSettings) if settings is not None else resolve(BenchSettings, {})
    _check_settings(settings)
    if isinstance(models, str | Path | Artifact):  # one model: a str was read as paths of one character each
        models = [models]
    # paths, as `kiln bench` takes: they were an AttributeError
    artifacts = [m if isinstance(m, Artifact) else load_artifact(m) for m in models]
    check_comparable(artifacts)
    include_source = settings.include_torch if include_source is None else include_source
    if report_dir is None and settings.report_dir:
        report_dir = Path(settings.report_dir)
    batch_sizes = list(dict.fromkeys(settings.batch_sizes))
    check_batch_sizes(artifacts, batch_sizes)
    if report_dir is not None:
        from kiln.bench.report import check_report_dir

        check_report_dir(report_dir)  # before the run, not after minutes of timing
    steps = len(batch_sizes) + 2

    def step(message: str, done: int) -> None:
        logger.info("bench: %s", message)
        if progress is not None:
            progress(message, done / steps)

    first = artifacts[0]
    step(f"loading {len(artifacts)} artifact(s) and held-out data", 0)
    if eval_data is not None:  # a model exported without held-out data (--model), or other data than its own
        held_out = as_eval_set(eval_data, first.manifest.signature.inputs)
        check_eval_fits(first, held_out)
        data = held_out.take(slice(0, settings.samples))
    elif not first.manifest.eval_data:  # eval_set's own advice names optimize's flag
        raise InvalidInput(
            f'model "{first.name}" v{first.version} has no held-out data, which kiln bench times and scores it on; '
            "pass some: `kiln bench ... --eval-data FILE.npz` (one array per input, named after it, and optional "
            '"labels"), or export it with some (`kiln export ... --dataset NAME`)',
            model=first.name,
        )
    else:
        data = eval_set(first, limit=settings.samples)
    candidates = build_candidates(artifacts, include_source=include_source)

    timings: dict[tuple[str, int], tuple[float, float, float]] = {}
    for i, batch_size in enumerate(batch_sizes, start=1):
        step(f"timing batch size {batch_size} on {len(candidates)} engine(s)", i)
        requests = [make_request(data, index) for index in request_windows(data.rows, batch_size)]
        seconds = time_round_robin(
            candidates, requests, batch_size, warmup_runs=settings.warmup_runs, runs=settings.runs
        )
        for name, values in seconds.items():
            timings[name, batch_size] = latency_figures(values, batch_size)

    step("measuring fidelity on the whole evaluation set", len(batch_sizes) + 1)
    corpus, fidelity = _corpus_and_fidelity(first, candidates, data, max(batch_sizes))

    report = BenchReport(
        model=f"{first.name} v{first.version}",
        task=first.manifest.task,
        rows=[
            BenchRow(cand.name, bs, *timings[cand.name, bs], size_bytes=cand.size_bytes, fidelity=fidelity[cand.name])
            for bs in batch_sizes
            for cand in candidates
        ],
        corpus=corpus,
        hardware=copy.deepcopy(probe()),  # probe() is cached: never hand out its dict
        versions=package_versions(*VERSIONED_PACKAGES),
        settings=settings_dict(settings) | {"include_source": include_source, "engines": [c.name for c in candidates]},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if report_dir is not None:
        from kiln.bench.report import write_html

        write_html(report, report_dir)
    step("done", steps)
    return report


def _corpus_and_fidelity(
    first: Artifact, candidates: list[Candidate], data: EvalSet, batch_size: int
) -> tuple[list[CorpusThroughput], dict[str, dict[str, float]]]:
    """Whole-set outputs of each engine (fidelity against ``candidates[0]``); for text also sentences/s."""
    text = is_text(first)
    request = make_request(data, slice(None))
    passes = CORPUS_PASSES if text else 1
    seconds, outputs = corpus_passes(candidates, request, batch_size, passes)
    reference = outputs[candidates[0].name]
    # a text classifier trained by Kiln carries its labelled held-out texts: scored on the task, not by cosine
    embedding = first.manifest.task == "embedding" or (text and data.labels is None)
    task = first.manifest.task
    # A classifier's own label output scores the task where it has one of the labels' kind (classes 1..3, strings)
    outputs_of_first = first.manifest.signature.outputs
    labels_from = None if text else label_output(outputs_of_first, data.labels, task, scored=candidates[0].output)
    fidelity = {}
    for cand in candidates:
        if labels_from is None or labels_from not in [spec.name for spec in cand.engine.outputs]:
            fidelity[cand.name] = fidelity_of(
                reference, outputs[cand.name], task=task, embedding=embedding, labels=data.labels
            )
        else:
            assert data.labels is not None
            own = dataclasses.replace(cand, output=labels_from).infer(request, batch_size)
            fidelity[cand.name] = task_score(own, data.labels, task) | fidelity_of(
                reference, outputs[cand.name], task=task, embedding=embedding, labels=None
            )
    corpus = (
        [CorpusThroughput(c.name, batch_size, data.rows, data.rows / seconds[c.name]) for c in candidates]
        if text
        else []
    )
    return corpus, fidelity


# The ``kiln bench`` flag of each setting checked here, where it is not ``--`` + the name with dashes.
_FLAGS = {"warmup_runs": "--warmup"}


def _check_settings(settings: BenchSettings) -> None:
    rules: list[tuple[str, object, bool, str]] = [
        (
            "batch_sizes",
            list(settings.batch_sizes),
            bool(settings.batch_sizes) and min(settings.batch_sizes) >= 1,
            "at least one batch size, each >= 1 (e.g. 1,8,32)",
        ),
        ("runs", settings.runs, settings.runs >= 1, "an integer >= 1"),
        ("warmup_runs", settings.warmup_runs, settings.warmup_runs >= 0, "an integer >= 0"),
        ("samples", settings.samples, settings.samples >= 1, "an integer >= 1"),
    ]
    for name, value, ok, rule in rules:
        if not ok:
            raise ConfigError(
                f'bench setting "{name}" is {value}; it must be {rule}; fix '
                f"{_FLAGS.get(name, '--' + name.replace('_', '-'))} or KILN_{name.upper()}",
                setting=name,
                value=value,
            )
