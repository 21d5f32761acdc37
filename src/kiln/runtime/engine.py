"""The smallest interface every stage uses to run a model."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kiln.types import Feeds, TensorSpec


@runtime_checkable
class Engine(Protocol):
    """Runs a model on named numpy feeds and returns named numpy outputs."""

    name: str

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def run(self, feeds: Feeds) -> Feeds: ...
