"""The accuracy-guarded, hardware-aware search.

For each candidate recipe: build it, measure fidelity to the parent on held-out data, then speed against the
parent on this machine in the same loop. Keep the Pareto front; choose the fastest variant inside the accuracy
budget that is really faster than its parent here. The chosen variant becomes a new version; nothing is written
when nothing qualifies.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln import artifact as artifacts
from kiln.config import OptimizeSettings, check_settings_object, settings_dict
from kiln.data import (
    CALIBRATION_TEXTS,
    TEXT_EVAL_OFFSET,
    EvalSet,
    as_eval_set,
    check_eval_fits,
    english_corpus,
    eval_set,
)
from kiln.errors import AccuracyBudgetError, CalibrationError, ConfigError, InvalidInput
from kiln.fidelity import pareto_front, relative_drop
from kiln.optimize.build import RecipeBuilder
from kiln.optimize.measure import Workload, compare_speed, open_engine, paired_ratios
from kiln.optimize.recipes import Recipe, candidates
from kiln.optimize.result import CandidateReport, OptimizeResult
from kiln.runtime import TextTokenizer, probe
from kiln.types import Feeds

logger = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
_CALIBRATION_ROWS = CALIBRATION_TEXTS  # tabular models calibrate on as many held-out rows
_CALIBRATION_BATCH = 16
_MIN_SPLIT_ROWS = 8  # fewer held-out rows cannot give both the guard and the calibration a share


def optimize(
    parent: artifacts.Artifact | Path | str,
    *,
    settings: OptimizeSettings | None = None,
    calibration: Sequence[Feeds] | None = None,
    eval_data: EvalSet | tuple[Any, ...] | None = None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Search for a faster variant of ``parent`` (an artifact, or its model or version directory) within the
    accuracy budget; write it as a new version.

    Raises:
        AccuracyBudgetError: no candidate kept fidelity within budget (nothing is written; the message names the
            best candidate found and its fidelity).
        CalibrationError: user ``calibration`` feeds do not match the model's inputs.

    Example:
        >>> result = optimize(load("kiln-repo/minilm"))  # doctest: +SKIP
        >>> result.chosen.version, result.best.speedup  # doctest: +SKIP
        (2, 2.6)
    """
    if not isinstance(parent, artifacts.Artifact):  # a path, as `kiln optimize` takes: it was an AttributeError
        parent = artifacts.load(parent)
    parent.check_in_its_model_directory()  # before minutes of search, not at the write
    settings = check_settings_object(settings, OptimizeSettings)
    report = progress or (lambda _msg, _frac: None)
    hardware = probe()
    recipes = candidates(parent, gpu=bool(hardware["gpu"]), names=settings.recipes)
    if calibration is not None and not any(step.kind == "int8_static" for r in recipes for step in r.steps):
        raise ConfigError(  # it was ignored without a word
            "calibration data is used by the int8-static-* recipes only, and none of "
            f"{', '.join(r.name for r in recipes)} is one; add one to --recipes, or leave --calibration out",
        )
    if eval_data is None:
        data = eval_set(parent, limit=settings.eval_samples)
    else:  # the caller's held-out rows (a model exported without any), as export_model takes them too
        held_out = as_eval_set(eval_data, parent.manifest.signature.inputs)
        check_eval_fits(parent, held_out)
        data = held_out.take(slice(0, settings.eval_samples))
    # Static INT8 calibrates on held-out rows the guard never scores (with or without labels): a variant calibrated
    # on the rows it is judged on would pass a guard it may fail on new data. Text models calibrate on corpus texts
    # before the evaluation offset instead.
    calibration_pool: EvalSet | None = None
    static_skip_reason = ""
    if data.feeds is not None and data.rows >= _MIN_SPLIT_ROWS:
        data, calibration_pool = data.take(slice(0, data.rows * 3 // 4)), data.take(slice(data.rows * 3 // 4, None))
    elif data.feeds is not None and calibration is None:
        static_skip_reason = (
            f"static INT8 needs calibration rows apart from the ones the accuracy guard scores; the held-out set "
            f"has {data.rows} rows (at least {_MIN_SPLIT_ROWS} to split); export with more eval_data or pass "
            "calibration data (--calibration)"
        )
    workload = Workload(parent, data)
    batch_sizes = tuple(sorted({*settings.batch_sizes, settings.target_batch_size}))
    started = time.monotonic()

    parent_engine = open_engine(parent.model_path, f"{parent.name} v{parent.version}")
    reference = workload.predict(parent_engine, settings.target_batch_size)
    parent_figures = workload.fidelity(reference, reference)
    parent_score = parent_figures["score"]
    parent_size = parent.model_path.stat().st_size

    def calibration_data() -> Sequence[Feeds]:
        return calibration if calibration is not None else _calibration_from(parent, workload, calibration_pool)

    reports: list[CandidateReport] = []
    with tempfile.TemporaryDirectory(prefix="kiln-optimize-") as tmp:
        builder = RecipeBuilder(parent.model_path, parent.manifest.signature, Path(tmp), calibration_data)
        for index, recipe in enumerate(recipes):
            report(f"{recipe.name}: building", index / len(recipes))
            if time.monotonic() - started > settings.time_budget_s:
                reports.append(CandidateReport.skipped(recipe, f"time budget of {settings.time_budget_s:g} s spent"))
                continue
            if static_skip_reason and any(step.kind == "int8_static" for step in recipe.steps):
                reports.append(CandidateReport.skipped(recipe, static_skip_reason))
                continue
            reports.append(
                _evaluate(
                    recipe,
                    builder,
                    workload,
                    parent_engine,
                    reference,
                    parent_score,
                    parent_size,
                    batch_sizes,
                    settings,
                )
            )
        report("choosing", 1.0)
        _mark_front(reports, settings.objective)
        eligible = [r for r in reports if r.status == "eligible"]
        if settings.objective == "size":
            best = min(eligible, key=lambda r: r.size_bytes, default=None)
        else:
            best = max(eligible, key=lambda r: r.speedup, default=None)
        if best is None:
            guarded = [r for r in reports if r.figures]
            if guarded and not any(r.within_budget for r in guarded):
                closest = max(guarded, key=lambda r: r.figures["score"])
                raise AccuracyBudgetError(
                    f"no variant of {parent.name} v{parent.version} stays within the accuracy budget "
                    f"({_budget_text(parent.manifest.task, settings)}); the best found was {closest.recipe.name} "
                    f"with {_score_text(parent.manifest.task, closest.figures)}; loosen --max-accuracy-drop/"
                    "--min-cosine or try other recipes. Nothing was written.",
                    best=closest.to_dict(),
                )
            return OptimizeResult(parent, None, reports, hardware, settings_dict(settings), parent_figures)
        best.status = "chosen"
        chosen = _write_variant(parent, best, settings, hardware)
    logger.info("chose %s: %.2fx at batch %d", best.recipe.name, best.speedup, settings.target_batch_size)
    return OptimizeResult(parent, chosen, reports, hardware, settings_dict(settings), parent_figures)


def _evaluate(
    recipe: Recipe,
    builder: RecipeBuilder,
    workload: Workload,
    parent_engine: Any,
    reference: Any,
    parent_score: float,
    parent_size: int,
    batch_sizes: tuple[int, ...],
    settings: OptimizeSettings,
) -> CandidateReport:
    try:
        path, history = builder.build(recipe)
        engine = open_engine(path, recipe.name)
    except CalibrationError:
        raise
    except Exception as exc:  # a pass that cannot apply to this graph is a finding, not a crash
        logger.info("recipe %s failed: %s", recipe.name, exc, exc_info=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CandidateReport(recipe=recipe, status="rejected", reason=f"does not apply to this graph: {reason}")
    figures = workload.fidelity(reference, workload.predict(engine, settings.target_batch_size))
    candidate = CandidateReport(recipe=recipe, path=path, history=history, figures=figures)
    candidate.size_bytes = path.stat().st_size
    if workload.task == "embedding" or workload.data.labels is None:
        candidate.within_budget = figures["score"] >= settings.min_cosine
    else:
        candidate.within_budget = relative_drop(parent_score, figures["score"]) <= settings.max_accuracy_drop
    speeds = compare_speed(
        {"parent": parent_engine, "candidate": engine}, workload, batch_sizes, settings.measure_repeats
    )
    candidate.speed = speeds["candidate"].to_dict()
    candidate.parent_speed = speeds["parent"].to_dict()
    target = settings.target_batch_size
    candidate.speedup = speeds["candidate"].throughput(target) / speeds["parent"].throughput(target)
    ratios = paired_ratios(speeds["candidate"], speeds["parent"], target)
    # "Really faster" means the median ratio clears the bar AND the candidate won most paired rounds;
    # one lucky round on a noisy machine does not make a variant.
    consistent = sum(r > 1.0 for r in ratios) > len(ratios) / 2
    if not candidate.within_budget:
        candidate.status, candidate.reason = "rejected", f"accuracy guard: {_score_text(workload.task, figures)}"
    elif settings.objective == "size":
        smaller = parent_size / candidate.size_bytes
        candidate.status = "eligible" if smaller > 1.0 else "rejected"
        candidate.reason = (
            f"{smaller:.2f}x smaller, {candidate.speedup:.2f}x speed at batch {target}"
            if smaller > 1.0
            else f"not smaller than its parent ({candidate.size_bytes} vs {parent_size} bytes)"
        )
    elif candidate.speedup < settings.min_speedup or not consistent:
        candidate.status = "rejected"
        candidate.reason = (
            f"not faster than its parent here: {candidate.speedup:.2f}x at batch {target}, faster in "
            f"{sum(r > 1.0 for r in ratios)}/{len(ratios)} paired rounds (needs >= {settings.min_speedup:.2f}x "
            "and most rounds)"
        )
    else:
        candidate.status, candidate.reason = "eligible", f"{candidate.speedup:.2f}x at batch {target}"
    return candidate


def _mark_front(reports: list[CandidateReport], objective: str) -> None:
    """Mark the candidates no other beats on both fidelity and the objective (speed, or smallness for "size"):
    the pick, the best on the objective within the budget, is always among them."""
    measured = [r for r in reports if r.figures]
    second = (lambda r: -float(r.size_bytes)) if objective == "size" else (lambda r: r.speedup)
    front = pareto_front([(r.figures["score"], second(r)) for r in measured])
    for r, on_front in zip(measured, front, strict=True):
        r.pareto = on_front


def _budget_text(task: str, settings: OptimizeSettings) -> str:
    if task == "embedding":
        return f"mean cosine >= {settings.min_cosine:g} to the parent"
    return f"at most {settings.max_accuracy_drop:.1%} relative accuracy drop"


def _score_text(task: str, figures: dict[str, float]) -> str:
    if "mean_cosine" in figures:
        return f"mean cosine {figures['mean_cosine']:.4f} (worst {figures['worst_cosine']:.4f})"
    if "accuracy" in figures:
        return f"accuracy {figures['accuracy']:.4f}"
    if "r2" in figures:
        return f"R² {figures['r2']:.4f}"
    return f"score {figures['score']:.4f}"


def _calibration_from(parent: artifacts.Artifact, workload: Workload, pool: EvalSet | None) -> list[Feeds]:
    """Calibration batches from data the guard does not evaluate on (corpus texts before the eval offset)."""
    if workload.tokenizer is not None:
        texts = english_corpus(_CALIBRATION_ROWS, offset=max(0, TEXT_EVAL_OFFSET - _CALIBRATION_ROWS))
        names = parent.manifest.signature.input_names
        return [
            TextTokenizer.pad(workload.tokenizer.encode(texts[i : i + _CALIBRATION_BATCH]), names)
            for i in range(0, len(texts), _CALIBRATION_BATCH)
        ]
    source = pool
    if source is None or source.feeds is None:  # never the guard's own rows (workload.data)
        raise InvalidInput(
            f'model "{parent.name}" has no held-out rows apart from the guard\'s to calibrate on; pass --calibration'
        )
    # NOTE: equal-sized batches: ORT's calibrators stack per-batch statistics and fail on a ragged last batch.
    batch = min(_CALIBRATION_BATCH, source.rows)
    rows = min(source.rows, _CALIBRATION_ROWS) // batch * batch
    return [{k: v[i : i + batch] for k, v in source.feeds.items()} for i in range(0, rows, batch)]


def _write_variant(
    parent: artifacts.Artifact, best: CandidateReport, settings: OptimizeSettings, hardware: dict[str, Any]
) -> artifacts.Artifact:
    from kiln.export import check_structure, signature_of

    assert best.path is not None
    pm = parent.manifest
    manifest = artifacts.Manifest(
        name=pm.name,
        signature=signature_of(check_structure(best.path)),
        task=pm.task,
        preprocessing=pm.preprocessing,
        postprocessing=pm.postprocessing,
        provenance={
            "source": pm.provenance.get("source", {}),
            "parent": parent.ref(),
            "transforms": [*pm.provenance.get("transforms", []), {"name": best.recipe.name, "steps": best.history}],
            "versions": pm.provenance.get("versions", {}),
        },
        checks=pm.checks | {"fidelity": {"against": parent.ref(), **best.figures}},
        benchmarks=[
            {
                "hardware": hardware,
                "speed": best.speed,
                "parent_speed": best.parent_speed,
                "speedup": best.speedup,
                "target_batch_size": settings.target_batch_size,
            }
        ],
        hardware=hardware,
        settings=pm.settings | {"optimize": settings_dict(settings)},
        eval_data=pm.eval_data,
    )
    assets: dict[str, Path | bytes] = (
        {p.name: p for p in parent.assets_dir.iterdir()} if parent.assets_dir.is_dir() else {}
    )
    return artifacts.write(parent.repository, manifest, best.path, assets=assets)
