"""``train(settings)``: data -> model -> loop (checkpointed, tracked) -> evaluation -> a Kiln artifact."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln import artifact as artifacts
from kiln._utils import sha256_file
from kiln.config import ExportSettings, check_settings_object, settings_dict
from kiln.errors import CheckpointError, ConfigError, TrainingDiverged
from kiln.train.checkpoint import Checkpointer, SavedCheckpoint, restore_rng
from kiln.train.distributed import is_worker, launch, load_artifact, write_result
from kiln.train.finetune import prune_and_finetune
from kiln.train.goodput import GoodputSizer
from kiln.train.loop import StepStats, Trainer, make_accelerator
from kiln.train.optim import lr_schedule, make_optimizer
from kiln.train.prune import unit_groups
from kiln.train.settings import TrainSettings, changed_identity, check_schedule_length
from kiln.train.tracking import make_tracker
from kiln.train.workload import prepare_workload, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one run produced: the artifact (``None`` with ``export = false``), metrics and where things went."""

    settings: TrainSettings
    artifact: artifacts.Artifact | None
    metrics: dict[str, float]
    steps: int
    checkpoint: Path | None
    tracking_run_id: str | None
    resumed_from_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    batch_size_changes: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> Any:
        """A rich Table of the final figures (the CLI prints it)."""
        from rich.table import Table

        table = Table(title=f"kiln train: {self.settings.run_name}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in self.metrics.items():
            if key.startswith("params"):  # counts, kept as floats among the metrics: 17,397,506 not 17397506.0000
                table.add_row(key, f"{value:,.0f}")
            else:
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        table.add_row(
            "steps", str(self.steps) + (f" (resumed at {self.resumed_from_step})" if self.resumed_from_step else "")
        )
        for change in self.batch_size_changes:
            table.add_row(f"batch size @ step {change['step']}", f"{change['from']} -> {change['to']}")
        table.add_row("checkpoint", str(self.checkpoint) if self.checkpoint else "-")
        table.add_row("artifact", f"{self.artifact.path}" if self.artifact else "- (export = false)")
        table.add_row("mlflow run", self.tracking_run_id or "- (track = false)")
        return table


def train(
    settings: TrainSettings,
    *,
    export_settings: ExportSettings | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    result_file: Path | None = None,
) -> TrainResult:
    """Train the model ``settings`` describe and write it as a Kiln artifact.

    ``on_step`` receives a :class:`StepStats` after every optimiser step (loss, lr, samples/s, ETA); with
    ``nproc`` > 1 the steps run in worker processes, and it receives rank 0's, relayed at most every 0.1 s (and
    the last). ``result_file`` is for those workers: rank 0 writes its result record there.

    Raises:
        ConfigError: a setting is invalid, or a resume changes a setting that shapes the optimisation path.
        InvalidInput: unknown dataset/column, labels that do not fit the model's output.
        CheckpointError: nothing to resume from, a corrupt checkpoint, or a fresh run over an existing one.
        TrainingDiverged: the loss became NaN/inf (the message names the last good checkpoint).

    Example:
        >>> result = train(TrainSettings(dataset="iris", epochs=2, track=False, export=False,
        ...                              checkpoint_dir=str(tmp_path / "ckpt")))  # doctest: +SKIP
        >>> result.metrics["test_accuracy"] > 0.5  # doctest: +SKIP
        True
    """
    settings = check_settings_object(settings, TrainSettings)  # a dict was an AttributeError
    if settings.nproc > 1 and not is_worker():
        relay = (lambda figures: on_step(StepStats(**figures))) if on_step is not None else None
        return _result_from_record(settings, launch(settings, export_settings, relay))
    threads = torch.get_num_threads()
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    try:
        return _train(settings, export_settings, on_step, result_file)
    finally:  # a Python caller's process went on at the run's thread count
        torch.set_num_threads(threads)


def _train(
    settings: TrainSettings,
    export_settings: ExportSettings | None,
    on_step: Callable[[StepStats], None] | None,
    result_file: Path | None,
) -> TrainResult:
    work = prepare_workload(settings, export_settings)
    model, sampler = work.model, work.sampler
    if settings.prune_ratio:  # a model pruning cannot take was refused after the whole training run
        unit_groups(model)
    # the fine-tune after pruning walks its own epochs from the start: a copy before training moves the sampler
    fresh_sampler = copy.deepcopy(sampler) if settings.prune_ratio else None
    optimizer = make_optimizer(model, settings)
    total_steps = settings.max_steps or sampler.optimizer_steps(settings.epochs, settings.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, total_steps))
    accelerator = make_accelerator(settings.device, settings.mixed_precision)
    if accelerator.process_index:
        # NOTE: every rank built the model from the same seed (DDP starts from rank 0's weights anyway); from here
        # each draws its own dropout masks, as one process draws a mask a row. Alike, two rows of a global batch
        # at the same place in each rank's share got the same mask. Rank 0 keeps the seed's streams, so a
        # one-process run is unchanged.
        seed_everything(settings.seed + accelerator.process_index)
    sizer = (
        GoodputSizer(base_batch=settings.batch_size, max_batch=settings.max_batch_size or 16 * settings.batch_size)
        if settings.adaptive_batch
        else None
    )
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        sampler,
        work.tensors,
        work.loss_sum,
        accelerator=accelerator,
        collate=work.collate,
        grad_accum_steps=settings.grad_accum_steps,
        sizer=sizer,
        noise_every=settings.noise_every,
        optimizer_kind=settings.optimizer,
    )

    checkpointer = Checkpointer(settings.checkpoint_path, keep=settings.keep_checkpoints)
    data_sha256 = _data_sha256(settings.dataset)
    resumed_from, run_id = _resume(trainer, checkpointer, settings, data_sha256)
    resumed_step = resumed_from.step if resumed_from else 0
    main = bool(accelerator.is_main_process)  # rank 0 alone checkpoints, tracks and exports
    accelerator.wait_for_everyone()  # no rank may see rank 0's first checkpoint as "an existing run"
    tracker = make_tracker(
        settings.track and main, settings.tracking_uri, settings.experiment, run_name=settings.run_name, run_id=run_id
    )
    if run_id is None:
        tracker.log_params(settings_dict(settings) | {"total_steps": total_steps, "train_rows": work.train_rows})
        tracker.log_dict(settings_dict(settings), "train_settings.json")

    history: list[dict[str, float]] = []

    def report(stats: StepStats) -> None:
        if stats.step % settings.log_every == 0 or stats.step == stats.total_steps:
            row = {"loss": stats.loss, "lr": stats.lr, "samples_per_s": stats.samples_per_s}
            row["batch_size"] = float(stats.batch_size)
            if stats.tokens:
                row["tokens_per_s"] = stats.tokens_per_s
            tracker.log_metrics(row, stats.step)
            history.append({"step": float(stats.step), **row})
            logger.info("step %d/%d loss %.4f", stats.step, stats.total_steps, stats.loss)
        if on_step is not None:
            on_step(stats)

    try:
        saved = trainer.fit(
            total_steps,
            checkpointer=checkpointer,  # rank 0 writes the checkpoint, the others their RNG states beside it
            checkpoint_every=settings.checkpoint_every,
            extra_state=lambda: {
                "settings": settings_dict(settings),
                "tracking_run_id": tracker.run_id,
                "data_sha256": data_sha256,
            },
            on_step=report,
            stop_at_epoch=settings.epochs if settings.adaptive_batch and not settings.max_steps else None,
            resumed_from=resumed_from,
        )
    except TrainingDiverged:
        tracker.finish("FAILED")
        raise
    except BaseException:
        tracker.finish("KILLED")
        raise

    if resumed_from is not None and trainer.step == resumed_step and fresh_sampler is None:
        tracker.finish("FINISHED")  # it was: the run ended before this resume
        raise ConfigError(
            f'the run in "{settings.checkpoint_path}" already trained {resumed_step} steps, and epochs = '
            f"{settings.epochs}{f' (max_steps = {settings.max_steps})' if settings.max_steps else ''} leaves none "
            "to train; raise epochs or max_steps to train it further, or set prune_ratio to prune it (nothing was "
            "written)",
            step=resumed_step,
        )
    final_model = trainer.trained_model()
    metrics = work.evaluate(final_model) | work.extra_metrics
    steps, pruning = trainer.step, None
    if fresh_sampler is not None:
        dense = {f"dense_{k}": v for k, v in metrics.items() if k.startswith("test_")}
        final_model, pruned, tuned_steps = prune_and_finetune(
            final_model,
            work,
            settings,
            sampler=fresh_sampler,
            accelerator=accelerator,
            step_offset=steps,
            on_step=report,
        )
        steps += tuned_steps
        pruning = pruned.to_dict() | {"finetune_steps": tuned_steps}
        metrics = dense | work.evaluate(final_model) | work.extra_metrics
        metrics |= {"params_dense": float(pruned.params_before), "params": float(pruned.params_after)}
    if "teacher_test_accuracy" in metrics:
        metrics["accuracy_vs_teacher"] = metrics["test_accuracy"] - metrics["teacher_test_accuracy"]
    metrics["final_loss"] = history[-1]["loss"] if history else float("nan")
    tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, steps)
    artifact = None
    if settings.export and main:
        artifact = work.export(
            final_model,
            {
                "settings": settings_dict(settings),
                "metrics": metrics,
                "steps": steps,
                "pruning": pruning,
                "resumed_from_step": resumed_step,
                "checkpoint": str(saved.path) if saved else None,
                "mlflow_run_id": tracker.run_id,
                "teacher": settings.teacher or None,
                "batch_size_changes": sizer.changes if sizer else [],
            },
        )
        # absolute: the run is read from wherever MLflow's UI runs, not from this run's working directory
        tracker.set_tags({"kiln.artifact": str(artifact.path.resolve()), "kiln.artifact.sha256": artifact.sha256})
        tracker.log_dict(artifact.manifest.to_dict(), "kiln.json")
    tracker.finish()
    result = TrainResult(
        settings=settings,
        artifact=artifact,
        metrics=metrics,
        steps=steps,
        checkpoint=saved.path if saved else None,
        tracking_run_id=tracker.run_id,
        resumed_from_step=resumed_step,
        history=history,
        batch_size_changes=sizer.changes if sizer else [],
    )
    if result_file is not None and main:
        write_result(result_file, _record(result))
    return result


def _record(result: TrainResult) -> dict[str, Any]:
    return {
        "artifact": str(result.artifact.path) if result.artifact else None,
        "metrics": result.metrics,
        "steps": result.steps,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "tracking_run_id": result.tracking_run_id,
        "resumed_from_step": result.resumed_from_step,
        "history": result.history,
        "batch_size_changes": result.batch_size_changes,
    }


def _result_from_record(settings: TrainSettings, record: dict[str, Any]) -> TrainResult:
    return TrainResult(
        settings=settings,
        artifact=load_artifact(record),
        metrics=record["metrics"],
        steps=int(record["steps"]),
        checkpoint=Path(record["checkpoint"]) if record["checkpoint"] else None,
        tracking_run_id=record["tracking_run_id"],
        resumed_from_step=int(record["resumed_from_step"]),
        history=record["history"],
        batch_size_changes=record["batch_size_changes"],
    )


def _data_sha256(dataset: str) -> str | None:
    """The dataset file's sha256 (None for a bundled dataset, which cannot change under a run)."""
    path = Path(dataset)
    return sha256_file(path) if path.is_file() else None


def _resume(
    trainer: Trainer, checkpointer: Checkpointer, settings: TrainSettings, data_sha256: str | None
) -> tuple[SavedCheckpoint | None, str | None]:
    """Load the checkpoint ``settings.resume`` names (``"latest"`` or a path): ``(that checkpoint, its run id)``."""
    if not settings.resume:
        existing = checkpointer.latest()
        if existing is not None:
            raise CheckpointError(
                f'"{checkpointer.directory}" already holds a checkpoint of a run (step {existing.step}); resume it '
                '(--resume; resume = "latest" in a config or TrainSettings), or choose another checkpoint_dir '
                "(nothing was overwritten)",
                path=str(checkpointer.directory),
            )
        stray = checkpointer.later_than(-1)  # without latest.json (removed, or the run died before writing it)
        if stray:  # a fresh run would have written its steps among them, and over those of the same number
            raise CheckpointError(
                f'"{checkpointer.directory}" holds checkpoints ({stray[-1].name} and {len(stray) - 1} more) but no '
                f'latest.json; resume one (--resume-from {stray[-1]}; resume = "{stray[-1]}" in a config or '
                "TrainSettings), or choose another checkpoint_dir (nothing was overwritten)",
                path=str(checkpointer.directory),
            )
        return None, None
    path = None if settings.resume == "latest" else Path(settings.resume)
    state = checkpointer.load(path)
    if path is None:  # load() read and checked the pointer: it names a file
        pointed = checkpointer.latest()
        assert pointed is not None
        path = pointed.path
    changed = changed_identity(state.get("settings", {}), settings_dict(settings))
    if changed:
        saved = state["settings"]
        detail = ", ".join(f"{k}: {saved[k]!r} -> {settings_dict(settings)[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume: these settings differ from the checkpoint's ({detail}), so the run would not continue "
            "the same way; restore them, or start a new run in another checkpoint_dir",
            changed=changed,
        )
    check_schedule_length(state.get("settings", {}), settings_dict(settings))
    if state.get("data_sha256") not in (None, data_sha256):  # rows added or changed: another split, other batches
        raise ConfigError(
            f'cannot resume: the dataset file "{settings.dataset}" changed since the checkpoint was written (its '
            "sha256 differs), so the run would not continue on the data it trained on; restore the file, or start a "
            "new run in another checkpoint_dir",
            path=settings.dataset,
        )
    saved, current = state.get("settings", {}), settings_dict(settings)
    branched = [k for k in ("lr", "warmup_steps") if k in saved and saved[k] != current[k]]
    later = checkpointer.later_than(int(state.get("step", 0))) if branched else []
    if later:  # same names, other weights: an exact resume rewrites them as they were, a branch would lose them
        raise CheckpointError(
            f'"{checkpointer.directory}" holds checkpoints after step {state.get("step")}, the one resumed '
            f"({', '.join(p.name for p in later)}), and a resume with another {' and '.join(branched)} would "
            "overwrite them with a different run; write it into another checkpoint_dir, or move them aside "
            "(nothing was overwritten)",
            path=str(checkpointer.directory),
        )
    trainer.load_state_dict(state)  # rank 0's RNG states, on every rank
    rank = trainer.accelerator.process_index
    if rank:
        own = checkpointer.load_rank_rng(path, trainer.step, rank)
        if own is not None:
            restore_rng(own)
        else:
            logger.warning(
                "rank %d saved no RNG states at step %d (the run stopped between rank 0's write and its own): it "
                "goes on with rank 0's, so its dropout masks differ from an unbroken run's",
                rank,
                trainer.step,
            )
    logger.info("resumed from step %d (%s)", trainer.step, path)
    run_id = state.get("tracking_run_id") if settings.track else None
    return SavedCheckpoint(trainer.step, path), run_id
