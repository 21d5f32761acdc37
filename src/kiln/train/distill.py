"""Knowledge distillation: a teacher's softened logits guide a smaller student.

The teacher is a Kiln artifact run through ONNX Runtime (``OrtEngine``) or a torch module. The data are in memory
and the teacher is frozen, so its logits for every training row are computed once, before training; a step
then costs no teacher forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln import artifact as artifacts
from kiln.errors import InvalidInput
from kiln.runtime import OrtEngine

_PROBABILITY_TOLERANCE = 1e-3
_BATCH_ROWS = 512


def teacher_logits(
    teacher: str | nn.Module, x: np.ndarray[Any, Any], num_classes: int, labels: Sequence[str] = ()
) -> torch.Tensor:
    """The teacher's logits ``[N, num_classes]`` for features ``x``, in the order of the student's ``labels``.

    ``teacher`` is a torch module, a Kiln artifact directory (model or version directory), or a
    ``package.module:factory``. An artifact that outputs probabilities (e.g. a scikit-learn classifier) gives
    their logarithm, which is a valid logit vector (softmax of log-probabilities is the probabilities). An
    artifact that names its classes must name the student's: in another order, its columns are reordered.
    """
    if isinstance(teacher, nn.Module):
        return _torch_logits(teacher, x, num_classes, type(teacher).__name__)
    if ":" in teacher and not Path(teacher).exists():
        from kiln.train.models import load_factory

        return _torch_logits(load_factory(teacher), x, num_classes, teacher)
    art = artifacts.load(teacher)
    engine = OrtEngine(art.model_path)
    _check_teacher_input(str(teacher), engine, x.shape[1])
    name = engine.inputs[0].name
    outputs = [o for o in engine.outputs if o.dtype in ("FP32", "FP64") and o.shape[-1:] == (num_classes,)]
    if not outputs:
        raise InvalidInput(
            f'teacher "{teacher}" has no float output of width {num_classes} (its outputs: '
            f"{', '.join(f'{o.name} {list(o.shape)}' for o in engine.outputs)}); the teacher must classify the same "
            "classes as the student",
            teacher=str(teacher),
        )
    chosen = outputs[-1].name  # sklearn classifiers list (label, probabilities): the float one is last
    parts = [engine.run({name: x[i : i + _BATCH_ROWS]})[chosen] for i in range(0, len(x), _BATCH_ROWS)]
    values = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    if _looks_like_probabilities(values):
        values = values.clamp_min(1e-12).log()
    order = _student_order(str(teacher), art.manifest.postprocessing.get("labels") or [], labels)
    return values if order is None else values[:, order]


def _student_order(teacher: str, names: Sequence[Any], labels: Sequence[str]) -> list[int] | None:
    """The teacher's column for each of the student's classes, matched by name; None: as they are (where either
    has no names, or they agree)."""
    theirs, ours = [str(n) for n in names], [str(label) for label in labels]
    if not theirs or not ours or theirs == ours:
        return None
    if sorted(theirs) != sorted(ours):
        shown = ", ".join(map(repr, theirs[:6])), ", ".join(map(repr, ours[:6]))
        raise InvalidInput(
            f'teacher "{teacher}" classifies {shown[0]}{" ..." if len(theirs) > 6 else ""}, but the student\'s data '
            f"holds the classes {shown[1]}{' ...' if len(ours) > 6 else ''}; the teacher must classify the same "
            "classes, by name: train it on this data's labels",
            teacher=teacher,
        )
    return [theirs.index(label) for label in ours]


def _check_teacher_input(teacher: str, engine: OrtEngine, features: int) -> None:
    """The teacher must take this data's rows as they are: one float input ``[N, features]``."""
    inputs = engine.inputs
    if len(inputs) == 1 and inputs[0].dtype in ("FP32", "FP64") and inputs[0].shape[-1:] in ((features,), (-1,)):
        return
    takes = ", ".join(f"{i.name} {i.dtype} {list(i.shape)}" for i in inputs)
    raise InvalidInput(
        f'teacher "{teacher}" takes {takes}, but the student\'s rows are {features} float features; the teacher must '
        "be trained on the same features as the student (same dataset and columns, in the same order)",
        teacher=teacher,
    )


def _torch_logits(module: nn.Module, x: np.ndarray[Any, Any], num_classes: int, spec: str) -> torch.Tensor:
    from kiln.train.models import forward_rows

    module.eval()
    with torch.inference_mode():
        parts = [
            forward_rows(module, x[i : i + _BATCH_ROWS], role="teacher", spec=spec)
            for i in range(0, len(x), _BATCH_ROWS)
        ]
        values = torch.cat(parts)
    if values.shape != (len(x), num_classes):
        raise InvalidInput(
            f"the teacher returns shape {list(values.shape)}; distillation needs {[len(x), num_classes]} logits"
        )
    return values.float().clone()


def _looks_like_probabilities(values: torch.Tensor) -> bool:
    sums = values.sum(dim=1)
    return bool((values >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=_PROBABILITY_TOLERANCE))


def distillation_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Summed over rows: ``alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    The T² factor keeps the soft term's gradient scale independent of the temperature (Hinton et al., 2015).
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        log_target=True,
        reduction="sum",
    )
    hard = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    return alpha * t * t * soft + (1.0 - alpha) * hard
