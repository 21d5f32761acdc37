"""``TrainSettings``: everything one ``kiln train`` run needs, typed, frozen and resolved in one place.

A config file holds a ``[train]`` table (and optionally an ``[export]`` table for the final export)::

    [train]
    dataset = "digits"
    model = "mlp"
    epochs = 5

Resolve it with :func:`load_train_settings` (CLI flag > ``KILN_*`` environment > file > default); a misspelled
key is refused with the closest known key suggested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kiln.artifact import check_model_name
from kiln.config import ExportSettings, check_field_types, resolve
from kiln.errors import ConfigError, did_you_mean

TASKS = ("auto", "classification", "regression", "embedding")
PAIR_DATASETS = ("pydoc_pairs",)  # built-in (anchor, positive) text pairs for task = "embedding"
BUILTIN_MODELS = ("mlp", "cnn")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PRUNE_IMPORTANCE = ("l1", "taylor")

# Settings that may change between a run and its resume: they steer bookkeeping, the run's length, or the lr that
# a diverged run resumes with (TrainingDiverged advises both; the trainer applies them from the first resumed step).
RESUMABLE_CHANGES = frozenset(
    {
        # epochs and max_steps with schedule = "constant" only: a decaying one's length is fixed (check_schedule_length)
        "epochs",
        "max_steps",
        "lr",
        "warmup_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "checkpoint_dir",
        "resume",
        "track",
        "tracking_uri",
        "experiment",
        "out",
        "name",
        "export",
        "log_every",
        # pruning happens after the last step: a finished run may be resumed to prune it another way
        "prune_ratio",
        "prune_importance",
        "prune_epochs",
        "prune_lr",
        "prune_batches",
    }
)


MAX_CPU_THREADS = 1024


@dataclass(frozen=True)
class TrainSettings:
    """How ``kiln train`` builds, trains, checkpoints, tracks and exports one model.

    Data: ``dataset`` is a scikit-learn bundled dataset (``digits``, ``iris``, ``wine``, ``breast_cancer``,
    ``diabetes``) or a ``.csv`` file with a ``target`` column (``features`` default to every other column).
    Model: ``"mlp"`` (``hidden_sizes``), ``"cnn"`` (square images such as digits' 8x8), or a
    ``package.module:factory`` returning an ``nn.Module`` that maps a float batch ``[N, features]`` to
    ``[N, classes]`` logits (or ``[N, 1]`` for regression). The optimiser steps once per ``grad_accum_steps``
    micro-batches of ``batch_size`` rows; the loss of the whole window is divided by its row count, not by
    the number of micro-batches. ``cpu_threads`` > 0 sets torch's intra-op threads (small models on a busy
    machine often run faster on 1 thread than on all cores; 0 keeps torch's default). ``checkpoint_every`` is
    in optimiser steps (0: only at exit). ``nproc`` > 1 trains data-parallel on this machine under torchrun
    (gloo on CPU): each global batch of ``batch_size`` rows is split across the processes.
    Text: a ``.jsonl`` dataset (``text_column``, ``target`` default ``"label"``) with ``model = "minilm"`` (the
    bundled all-MiniLM-L6-v2) or a local Hugging Face directory; texts are truncated to ``max_length`` tokens,
    ``max_tokens`` > 0 batches by token budget instead of ``batch_size`` rows, ``lora_rank`` > 0 trains LoRA
    adapters (merged into the weights before export) instead of the whole encoder.
    Embeddings: ``task = "embedding"`` fine-tunes the encoder (mean pooling + L2 norm) on a ``.jsonl`` of pairs
    (``anchor_column``, ``positive_column``) or the built-in ``"pydoc_pairs"``, with in-batch negatives
    (cross-entropy of ``similarity_scale`` x cosine; each micro-batch of ``batch_size`` pairs is its own pool of
    negatives, accumulation does not enlarge it); held-out recall@1 and MRR are reported before and after.
    ``adaptive_batch`` lets the goodput sizer move the batch among ``batch_size`` x 2**k rows (up to
    ``max_batch_size``, default 16x ``batch_size``; the lr follows AdaScale's gain: x r for SGD, x sqrt(r) for Adam),
    mid-epoch too, to the size with the most progress per second, measured or predicted from the step times of the
    sizes it ran; the gradient noise scale is measured every ``noise_every`` steps.
    ``teacher`` (a Kiln artifact directory, or a ``package.module:factory``) turns on distillation:
    ``distill_alpha`` * T² * KL(teacher/T || student/T) + (1 - ``distill_alpha``) * cross-entropy.
    ``prune_ratio`` > 0 prunes after training: that fraction of the units of every prunable layer (hidden
    units/channels of mlp/cnn; attention heads and FFN width of a text encoder) is removed, ranked by
    ``prune_importance`` (``"l1"`` weight norm, or ``"taylor"``: |weight x gradient| on ``prune_batches``
    training batches); the smaller model is fine-tuned for ``prune_epochs`` at ``prune_lr`` (0: ``lr``) and
    exported. The fine-tune is not checkpointed: a resume of a finished run prunes and fine-tunes again.

    Example:
        >>> TrainSettings(dataset="iris", hidden_sizes=(16,), epochs=2).batch_size
        32
    """

    dataset: str = "digits"
    task: str = "auto"
    target: str = ""
    features: tuple[str, ...] = ()
    test_fraction: float = 0.25
    text_column: str = "text"
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    similarity_scale: float = 20.0
    max_length: int = 128
    max_tokens: int = 0
    lora_rank: int = 0
    model: str = "mlp"
    hidden_sizes: tuple[int, ...] = (64,)
    dropout: float = 0.0
    epochs: int = 5
    max_steps: int = 0
    batch_size: int = 32
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    mixed_precision: str = "no"
    device: str = "auto"
    cpu_threads: int = 0
    nproc: int = 1
    checkpoint_dir: str = ""
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = ""
    log_every: int = 10
    out: str = "kiln-repo"
    name: str = ""
    export: bool = True
    track: bool = True
    tracking_uri: str = ""
    experiment: str = "kiln"
    adaptive_batch: bool = False
    max_batch_size: int = 0
    noise_every: int = 4
    teacher: str = ""
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    prune_ratio: float = 0.0
    prune_importance: str = "l1"
    prune_epochs: int = 3
    prune_lr: float = 0.0
    prune_batches: int = 8

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.name:  # it names the artifact's directory: refused now, not after the training it would end
            check_model_name(self.name, fix='set name to a plain one, e.g. name = "digits-cnn"')
        _check_choice("task", self.task, TASKS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("prune_importance", self.prune_importance, PRUNE_IMPORTANCE)
        text = self.dataset.lower().endswith(".jsonl") or self.dataset in PAIR_DATASETS
        if not text and self.model not in BUILTIN_MODELS and ":" not in self.model:
            raise ConfigError(
                f'model "{self.model}" is neither a built-in model ({", ".join(BUILTIN_MODELS)}) nor a '
                'package.module:factory; e.g. model = "mlp" or model = "mypkg.models:build"',
                model=self.model,
            )
        positive = {
            "batch_size": self.batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "keep_checkpoints": self.keep_checkpoints,
            "log_every": self.log_every,
            "nproc": self.nproc,
            "max_length": self.max_length,
        }
        non_negative = {
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "checkpoint_every": self.checkpoint_every,
            "warmup_steps": self.warmup_steps,
            "cpu_threads": self.cpu_threads,
            "max_tokens": self.max_tokens,
            "lora_rank": self.lora_rank,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} is {value}; it must be >= 1", setting=key, value=value)
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} is {value}; it must be >= 0", setting=key, value=value)
        if self.cpu_threads > MAX_CPU_THREADS:  # 100000 made OpenBLAS fail to start its threads and segfault
            raise ConfigError(
                f"cpu_threads is {self.cpu_threads}; it must be at most {MAX_CPU_THREADS} (more threads than cores "
                "only wait for one another: 0 keeps torch's default, one per core)",
                setting="cpu_threads",
            )
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("epochs and max_steps are both 0; set epochs (e.g. 5) or max_steps (e.g. 500)")
        if self.lr <= 0:
            raise ConfigError(f"lr is {self.lr:g}; it must be > 0, e.g. 1e-3", setting="lr", value=self.lr)
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay is {self.weight_decay:g}; it must be >= 0, e.g. 0.01")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum is {self.momentum:g}; it must be in [0, 1), e.g. 0.9")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed is {self.seed}; it must be in 0..{2**32 - 1} (NumPy's and scikit-learn's range)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction is {self.test_fraction:g}; it must be in (0, 1), e.g. 0.25")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout is {self.dropout:g}; it must be in [0, 1)")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise ConfigError(
                f"distill_alpha {self.distill_alpha:g} must be in [0, 1] and distill_temperature "
                f"{self.distill_temperature:g} > 0"
            )
        if any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(f"hidden_sizes {list(self.hidden_sizes)} must be positive widths, e.g. [64, 32]")
        if self.adaptive_batch and (self.schedule != "constant" or self.grad_accum_steps != 1):
            raise ConfigError(
                'adaptive_batch changes the steps per epoch, so it needs schedule = "constant" '
                f'(got "{self.schedule}"; warmup_steps is fine) and grad_accum_steps = 1 (got {self.grad_accum_steps})'
            )
        if self.max_batch_size and self.max_batch_size < self.batch_size:
            raise ConfigError(f"max_batch_size {self.max_batch_size} is below batch_size {self.batch_size}")
        if self.noise_every < 1:
            raise ConfigError(f"noise_every is {self.noise_every}; it must be >= 1")
        self._check_prune()
        self._check_embedding(text)
        if text and 0 < self.max_tokens < self.max_length:  # a row cut at max_length fit no batch, mid-run
            raise ConfigError(
                f"max_tokens is {self.max_tokens}, below max_length {self.max_length}: a row of max_length tokens "
                f"would fit no batch; set max_tokens >= {self.max_length} (or lower max_length)",
                setting="max_tokens",
            )
        if self.adaptive_batch and self.max_tokens:
            raise ConfigError(
                f"adaptive_batch moves the batch among batch_size x 2**k rows, and max_tokens = {self.max_tokens} "
                "batches by token budget instead, so adaptive_batch would do nothing; set adaptive_batch = false or "
                "max_tokens = 0",
                setting="adaptive_batch",
            )
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ConfigError('mixed_precision "fp16" needs a GPU; on CPU use "bf16" or "no"')

    def _check_prune(self) -> None:
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ConfigError(
                f"prune_ratio is {self.prune_ratio:g}; it must be in [0, 1), e.g. 0.5 removes half of each layer",
                setting="prune_ratio",
                value=self.prune_ratio,
            )
        if self.prune_epochs < 0 or self.prune_batches < 1 or self.prune_lr < 0:
            raise ConfigError(
                f"prune_epochs {self.prune_epochs} must be >= 0, prune_batches {self.prune_batches} >= 1 and "
                f"prune_lr {self.prune_lr:g} >= 0 (0: use lr)"
            )
        if self.prune_ratio and (self.nproc > 1 or self.lora_rank):
            raise ConfigError(
                f"prune_ratio runs in one process on a fully trained model; it cannot be combined with nproc > 1 "
                f"(got {self.nproc}) or lora_rank > 0 (got {self.lora_rank}); remove one of them"
            )

    def _check_embedding(self, text: bool) -> None:
        if self.dataset in PAIR_DATASETS and self.task not in ("auto", "embedding"):
            raise ConfigError(
                f'dataset "{self.dataset}" holds text pairs for task = "embedding"; task "{self.task}" needs a '
                "labelled .jsonl file",
                setting="task",
                value=self.task,
            )
        if not self.is_embedding:
            return
        if not text:
            raise ConfigError(
                f'task "embedding" trains on text pairs; dataset "{self.dataset}" is not a .jsonl file: use a '
                f'.jsonl of {{"{self.anchor_column}": ..., "{self.positive_column}": ...}} rows or '
                f"{', '.join(PAIR_DATASETS)}",
                setting="dataset",
                value=self.dataset,
            )
        if self.batch_size < 2:
            raise ConfigError(
                f"batch_size is {self.batch_size}; embedding fine-tuning ranks each anchor against the other pairs "
                "of its batch, so it needs >= 2 (more pairs, more negatives: e.g. 32)",
                setting="batch_size",
                value=self.batch_size,
            )
        if self.similarity_scale <= 0:
            raise ConfigError(f"similarity_scale is {self.similarity_scale:g}; it must be > 0, e.g. 20")
        unsupported = {
            "teacher": bool(self.teacher),
            "prune_ratio": bool(self.prune_ratio),
            "adaptive_batch": self.adaptive_batch,  # a growing batch would change the pool of negatives as it trains
            "max_tokens": bool(self.max_tokens),  # the loss's difficulty would vary with each batch's pair count
        }
        if any(unsupported.values()):
            names = [k for k, v in unsupported.items() if v]
            raise ConfigError(
                f'task "embedding" does not support {", ".join(names)}; remove {"them" if len(names) > 1 else "it"} '
                "(it trains on fixed batches of batch_size pairs, without a teacher or pruning)",
                setting=names[0],
            )

    @property
    def is_embedding(self) -> bool:
        """True for embedding fine-tuning on pairs (``task = "embedding"``, or a built-in pairs dataset)."""
        return self.task == "embedding" or self.dataset in PAIR_DATASETS

    @property
    def run_name(self) -> str:
        """``name``, or the dataset's name (a CSV file's stem)."""
        return self.name or Path(self.dataset).stem.replace(".", "-")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir or f"kiln-checkpoints/{self.run_name}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f'{key} "{value}" is unknown{did_you_mean(value, choices)}; use one of {", ".join(choices)}',
            setting=key,
            value=value,
        )


def load_train_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> tuple[TrainSettings, ExportSettings]:
    """Resolve the ``[train]`` and ``[export]`` tables of ``config_file`` under ``overrides`` (``None`` = unset).

    Example:
        >>> settings, _ = load_train_settings(None, {"dataset": "iris", "epochs": 1}, environ={})
        >>> settings.dataset, settings.epochs
        ('iris', 1)
    """
    train = resolve(TrainSettings, overrides, config_file=config_file, section="train", environ=environ)
    export = resolve(ExportSettings, {}, config_file=config_file, section="export", environ=environ)
    return train, export


def changed_identity(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint and this run and would change the optimisation path."""
    names = [f.name for f in fields(TrainSettings)]
    return [k for k in names if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current.get(k)]


def check_schedule_length(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse a resume that changes the length of a decaying lr schedule (``epochs`` or ``max_steps``).

    Linear and cosine decay over the run's total steps, fixed when the run started (no state holds them): a new
    length would move the lr of every resumed step at once. A constant schedule may be extended.
    """

    def length(s: Mapping[str, Any]) -> tuple[str, Any]:
        return ("max_steps", s.get("max_steps")) if s.get("max_steps") else ("epochs", s.get("epochs"))

    if current["schedule"] == "constant" or "epochs" not in saved or length(saved) == length(current):
        return
    changed = [k for k in ("epochs", "max_steps") if saved.get(k) != current[k]]
    raise ConfigError(
        f"cannot resume with {', '.join(f'{k}: {saved.get(k)!r} -> {current[k]!r}' for k in changed)}: with schedule = "
        f'"{current["schedule"]}" epochs and max_steps set the steps the lr decays over, fixed when the run started, '
        f"so every resumed step's lr would jump; keep {' and '.join(f'{k} = {saved.get(k)!r}' for k in changed)}, or "
        "start a new run in another checkpoint_dir",
        changed=changed,
    )
