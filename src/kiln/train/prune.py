"""Structured pruning that really shrinks tensors: units are removed, not masked.

What is pruned: the hidden units / channels of a ``Sequential`` of ``Linear``/``Conv2d`` layers (the built-in
MLP and CNN, or a user's Sequential), and the attention heads and FFN width of every layer of a BERT-style
Hugging Face encoder (the bundled MiniLM). The output layer is never pruned. Each prunable layer keeps
``round(units * (1 - ratio))`` units (at least one): a uniform per-layer ratio, so the shrink is predictable.

A *unit group* lists the parameter slices one unit owns: the producer's output rows (and bias) and the
consumer's input columns. Its importance is summed over those slices: ``"l1"`` is the L1 norm of the weights
(Li et al., 2017); ``"taylor"`` is ``|sum(weight * gradient)|`` on a few training batches, the first-order
estimate of the loss change when the unit is removed (Molchanov et al., 2019).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.train.accumulate import Batch

IMPORTANCE = ("l1", "taylor")
# Layers between a producer and its consumer that act on each unit on its own, so a unit can be removed across them.
_PER_UNIT: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
)


@dataclass
class UnitGroup:
    """``size`` units; ``slices`` holds ``(parameter, dim, width)``: unit ``u`` owns ``[u*width, (u+1)*width)``
    of ``dim``. ``apply(keep)`` rebuilds the modules with only the ``keep`` units (a sorted index tensor)."""

    name: str
    size: int
    slices: list[tuple[torch.Tensor, int, int]]
    apply: Callable[[torch.Tensor], None]
    min_keep: int = 1


@dataclass(frozen=True)
class PruneReport:
    """What pruning removed: parameters before/after and the units of each group (``{"body.1": [64, 32]}``)."""

    ratio: float
    importance: str
    params_before: int
    params_after: int
    units: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "importance": self.importance,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "units": self.units,
        }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_model(
    model: nn.Module,
    ratio: float,
    *,
    importance: str = "l1",
    loss_sum: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    batches: Iterable[Batch] = (),
) -> PruneReport:
    """Remove ``ratio`` of the units of every prunable layer of ``model`` (in place); returns what was removed.

    ``"taylor"`` importance needs ``loss_sum`` and ``batches`` (the model's gradients are computed on them and
    cleared afterwards).

    Example:
        >>> from kiln.train.models import mlp
        >>> net = mlp(4, (16,), 3)
        >>> prune_model(net, 0.5).units, net[0].weight.shape
        ({'0': [16, 8]}, torch.Size([8, 4]))
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"prune_ratio is {ratio:g}; it must be in (0, 1), e.g. 0.5 to remove half of each layer")
    groups = unit_groups(model)
    before = count_params(model)
    scores = _scores(model, groups, importance, loss_sum, batches)
    units: dict[str, list[int]] = {}
    for group, score in zip(groups, scores, strict=True):
        keep_n = max(group.min_keep, round(group.size * (1.0 - ratio)))
        keep = torch.topk(score, keep_n).indices.sort().values
        group.apply(keep)
        units[group.name] = [group.size, keep_n]
    return PruneReport(ratio, importance, before, count_params(model), units)


def bert_layers(model: nn.Module) -> nn.ModuleList | None:
    """The layers of the BERT-style encoder a Kiln text model holds (``model.encoder.encoder.layer``), or ``None``."""
    layers = getattr(getattr(getattr(model, "encoder", None), "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) and layers and hasattr(layers[0], "attention") else None


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    """The prunable unit groups of ``model``; a clear error when its structure is not one pruning knows."""
    layers = bert_layers(model)
    if layers is not None:
        return [g for i, block in enumerate(layers) for g in _bert_groups(f"layer.{i}", block)]
    if isinstance(model, nn.Sequential):
        groups = _sequential_groups(model)
        if groups:
            return groups
    raise ConfigError(
        f"prune_ratio cannot prune a {type(model).__name__}: structured pruning knows Sequential stacks of "
        "Linear/Conv2d layers (the built-in mlp and cnn) and BERT-style Hugging Face encoders (minilm); "
        "remove prune_ratio, or build the model as an nn.Sequential",
        model=type(model).__name__,
    )


def _leaves(module: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Sequential, int, nn.Module]]:
    """``(name, parent, index, module)`` of every non-Sequential module, in forward order."""
    out: list[tuple[str, nn.Sequential, int, nn.Module]] = []
    for index, child in enumerate(module):
        name = f"{prefix}{index}"
        if isinstance(child, nn.Sequential):
            out += _leaves(child, f"{name}.")
        else:
            out.append((name, module, index, child))
    return out


def _sequential_groups(model: nn.Sequential) -> list[UnitGroup]:
    leaves = _leaves(model)
    weighted = [i for i, leaf in enumerate(leaves) if isinstance(leaf[3], nn.Linear | nn.Conv2d)]
    groups: list[UnitGroup] = []
    for a, b in itertools.pairwise(weighted):
        between = [leaf[3] for leaf in leaves[a + 1 : b]]
        if not all(isinstance(m, _PER_UNIT) for m in between):
            continue  # e.g. a BatchNorm or a user module: its per-unit state is not known here
        name, parent, index, producer = leaves[a]
        _, c_parent, c_index, consumer = leaves[b]
        size = _out_units(producer)
        width = _in_units(consumer) // size
        if width * size != _in_units(consumer) or (isinstance(consumer, nn.Conv2d) and width != 1):
            continue
        assert isinstance(producer, nn.Linear | nn.Conv2d) and isinstance(consumer, nn.Linear | nn.Conv2d)
        slices: list[tuple[torch.Tensor, int, int]] = [(producer.weight, 0, 1), (consumer.weight, 1, width)]
        if producer.bias is not None:
            slices.append((producer.bias, 0, 1))
        groups.append(UnitGroup(name, size, slices, _sequential_apply(parent, index, c_parent, c_index, width)))
    return groups


def _sequential_apply(
    parent: nn.Sequential, index: int, c_parent: nn.Sequential, c_index: int, width: int
) -> Callable[[torch.Tensor], None]:
    def apply(keep: torch.Tensor) -> None:
        # NOTE: looked up at apply time: an earlier group may already have replaced this producer (its inputs).
        parent[index] = _take(parent[index], 0, keep)
        c_parent[c_index] = _take(c_parent[c_index], 1, _expand(keep, width))

    return apply


def _out_units(layer: nn.Module) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)  # type: ignore[arg-type]


def _in_units(layer: nn.Module) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)  # type: ignore[arg-type]


def _expand(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices -> the indices of their ``width`` columns each (a Flatten after a conv: channel-major)."""
    return (keep[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _take(layer: nn.Module, dim: int, keep: torch.Tensor) -> nn.Module:
    """A new, smaller copy of a Linear/Conv2d keeping ``keep`` along ``dim`` (0: outputs, 1: inputs)."""
    assert isinstance(layer, nn.Linear | nn.Conv2d), f"cannot slice a {type(layer).__name__}"
    weight = layer.weight.detach().index_select(dim, keep.to(layer.weight.device))
    bias: torch.Tensor | None = None if layer.bias is None else layer.bias.detach()
    if bias is not None and dim == 0:
        bias = bias[keep]
    new: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
            bias=bias is not None,
        )
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias)
    return new


def _bert_groups(name: str, block: Any) -> list[UnitGroup]:
    """Heads (q/k/v rows, attention-output columns) and FFN width (intermediate rows, output columns)."""
    attention, out = block.attention.self, block.attention.output.dense
    head = int(attention.attention_head_size)
    heads = [(attention.query.weight, 0, head), (attention.key.weight, 0, head), (attention.value.weight, 0, head)]
    heads += [(attention.query.bias, 0, head), (attention.key.bias, 0, head), (attention.value.bias, 0, head)]
    heads.append((out.weight, 1, head))

    def apply_heads(keep: torch.Tensor) -> None:
        rows = _expand(keep, head)
        for proj in ("query", "key", "value"):
            setattr(attention, proj, _take(getattr(attention, proj), 0, rows))
        block.attention.output.dense = _take(block.attention.output.dense, 1, rows)
        attention.num_attention_heads = len(keep)  # (B, nh, T, hs): the forward infers nh from the shapes
        attention.all_head_size = len(keep) * head

    intermediate, output = block.intermediate.dense, block.output.dense
    ffn = [(intermediate.weight, 0, 1), (intermediate.bias, 0, 1), (output.weight, 1, 1)]

    def apply_ffn(keep: torch.Tensor) -> None:
        block.intermediate.dense = _take(block.intermediate.dense, 0, keep)
        block.output.dense = _take(block.output.dense, 1, keep)

    return [
        UnitGroup(f"{name}.heads", int(attention.num_attention_heads), heads, apply_heads),
        UnitGroup(f"{name}.ffn", int(intermediate.out_features), ffn, apply_ffn),
    ]


def _scores(
    model: nn.Module,
    groups: list[UnitGroup],
    importance: str,
    loss_sum: Callable[[nn.Module, Batch], torch.Tensor] | None,
    batches: Iterable[Batch],
) -> list[torch.Tensor]:
    if importance == "l1":
        return [_per_unit(g, lambda p: p.detach().abs()) for g in groups]
    if importance != "taylor":
        raise ConfigError(f'prune_importance "{importance}" is unknown; use one of {", ".join(IMPORTANCE)}')
    if loss_sum is None:
        raise ConfigError('prune_importance "taylor" needs training batches; use "l1" to prune from weights alone')
    model.zero_grad(set_to_none=True)
    model.train()
    seen = 0
    for batch in batches:
        torch.autograd.backward(loss_sum(model, batch))
        seen += 1
    if not seen:
        raise ConfigError('prune_importance "taylor" got no batches; set prune_batches >= 1 or use "l1"')
    scores = [_per_unit(g, _weight_times_grad, signed=True) for g in groups]
    model.zero_grad(set_to_none=True)
    return scores


def _weight_times_grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return param.detach() * grad


def _per_unit(group: UnitGroup, value: Callable[[torch.Tensor], torch.Tensor], *, signed: bool = False) -> torch.Tensor:
    """Sum ``value(p)`` over each unit's slices: ``(size,)``; ``signed`` sums first, then takes the magnitude."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for param, dim, _width in group.slices:
        # unit u owns `width` consecutive entries of `dim`: moved first, they are consecutive rows
        per = value(param).movedim(dim, 0).reshape(group.size, -1).double().sum(dim=1)  # (size,)
        total += per.cpu()
    return total.abs() if signed else total
