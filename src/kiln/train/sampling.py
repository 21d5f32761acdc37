"""Resumable batch samplers: fixed-size shuffled batches, and token-budget batches for variable-length data.

Both follow the same contract (also ``torch.utils.data.DataLoader(batch_sampler=...)``'s):

- an epoch's batches are a pure function of ``(seed, epoch)``, so no generator state needs saving;
- iterating yields the *remaining* batches of the current epoch and advances ``position``; once they are all
  handed out, the next epoch begins (``set_epoch`` may still choose one);
- ``state_dict()`` / ``load_state_dict()`` carry ``(epoch, position)``, so a run resumed mid-epoch sees exactly
  the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kiln.errors import ConfigError, InvalidInput


class _Resumable:
    """Epoch/position bookkeeping shared by the samplers; subclasses define ``epoch_batches``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def _batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.epoch_batches(self.epoch))
        return self._cache[1]

    def _generator(self, epoch: int) -> torch.Generator:
        # NOTE: seeded from (seed, epoch) alone: a resumed run rebuilds the same order without saved RNG state.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self._batches())

    def optimizer_steps(self, epochs: int, grad_accum_steps: int = 1) -> int:
        """Optimizer steps in epochs ``0 .. epochs - 1``, each ending at its epoch's end (a token budget's epochs
        differ by a batch or two: each packs its own shuffle)."""
        return sum(math.ceil(len(self.epoch_batches(e)) / grad_accum_steps) for e in range(epochs))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        # NOTE: an epoch iterated to its end moves to the next one, as next_window does: a DataLoader iterates its
        # batch sampler afresh each epoch, and without set_epoch() every epoch after the first was empty
        self.set_epoch(self.epoch + 1)

    def next_window(self, size: int) -> list[list[int]]:
        """Up to ``size`` next batches of this epoch (fewer at its end); moves to the next epoch when spent."""
        batches = self._batches()
        window = batches[self.position : self.position + size]
        self.position += len(window)
        if self.position >= len(batches):
            self.set_epoch(self.epoch + 1)
        return window

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ConfigError(
                f"the sampler state was saved with seed {state['seed']}, but this run uses seed {self.seed}; "
                "resume with the original seed",
                saved=int(state["seed"]),
                current=self.seed,
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position > len(self._batches()):
            raise ConfigError(
                f"the sampler state points at batch {self.position} of epoch {self.epoch}, but an epoch has only "
                f"{len(self._batches())} batches; the data or batch settings changed since the checkpoint"
            )


class ShuffledBatchSampler(_Resumable):
    """Rows ``0..num_rows-1`` reshuffled each epoch and cut into batches of ``batch_size`` (last may be short).

    Example:
        >>> sampler = ShuffledBatchSampler(10, 4, seed=0)
        >>> [len(b) for b in sampler]
        [4, 4, 2]
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int = 0) -> None:
        super().__init__(seed)
        if num_rows < 1 or batch_size < 1:
            raise ConfigError(f"num_rows ({num_rows}) and batch_size ({batch_size}) must be >= 1")
        self.num_rows = num_rows
        # How the current epoch is cut: (position, batch size) from each change on. Part of the state, so a run
        # resumed after a mid-epoch change sees the batches an uninterrupted one would have seen.
        self._cuts: list[tuple[int, int]] = [(0, batch_size)]

    @property
    def batch_size(self) -> int:
        """The size of the batches from here on (the last cut's)."""
        return self._cuts[-1][1]

    def set_batch_size(self, batch_size: int) -> None:
        """Cut the rest of the current epoch (and the epochs after it) into batches of ``batch_size`` rows.

        The batches already handed out stay as they were, so every row is still seen once per epoch.

        Example:
            >>> sampler = ShuffledBatchSampler(10, 2, seed=0)
            >>> _ = sampler.next_window(2)  # 4 rows
            >>> sampler.set_batch_size(4)
            >>> [len(b) for b in sampler.epoch_batches(0)]
            [2, 2, 4, 2]
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) must be >= 1")
        self._cuts = [(p, b) for p, b in self._cuts if p < self.position] + [(self.position, batch_size)]
        self._cache = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._cuts = [(0, self.batch_size)]
        self._cache = None

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"batch_size": self.batch_size, "cuts": [list(cut) for cut in self._cuts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = int(state.get("batch_size", self.batch_size))  # a state saved before cuts were recorded
        self._cuts = [(int(p), int(b)) for p, b in state.get("cuts", [(0, size)])]
        self._cache = None
        super().load_state_dict(state)

    def optimizer_steps(self, epochs: int, grad_accum_steps: int = 1) -> int:
        """As the base class counts, without building every epoch's shuffle: each epoch but the current one (whose
        batch size may have changed part-way) has the same batches. ``epochs = 10**11`` sat here for minutes."""
        whole = math.ceil(math.ceil(self.num_rows / self.batch_size) / grad_accum_steps)  # as epoch_batches cuts
        if not 0 <= self.epoch < epochs:
            return max(epochs, 0) * whole
        current = math.ceil(len(self.epoch_batches(self.epoch)) / grad_accum_steps)
        return (epochs - 1) * whole + current

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.num_rows, generator=self._generator(epoch)).tolist()
        cuts = self._cuts if epoch == self.epoch else [(0, self.batch_size)]
        batches: list[list[int]] = []
        start = 0
        for i, (_, size) in enumerate(cuts):
            until = cuts[i + 1][0] if i + 1 < len(cuts) else None  # the position where the next cut takes over
            while start < self.num_rows and (until is None or len(batches) < until):
                batches.append(order[start : start + size])
                start += size
        return batches


class TokenBudgetBatchSampler(_Resumable):
    """Length-bucketed batches whose *padded* size (rows x longest row) stays within ``max_tokens``.

    Each epoch: rows are sorted by length (ties broken at random), cut into buckets of neighbouring lengths
    (about ``bucket_batches`` full batches of tokens each, or ``bucket_rows`` rows), shuffled within each
    bucket, packed greedily into batches under the budget, and the batches are shuffled. Similar lengths in a
    batch mean little padding; the shuffles keep the order random from epoch to epoch. Deterministic for a
    given ``(seed, epoch)``.

    Example:
        >>> sampler = TokenBudgetBatchSampler([5, 3, 8, 2, 7, 7], max_tokens=16, seed=0)
        >>> all(max(sampler.lengths[i] for i in b) * len(b) <= 16 for b in sampler)
        True
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        seed: int = 0,
        bucket_batches: int = 2,
        bucket_rows: int | None = None,
    ) -> None:
        super().__init__(seed)
        if not lengths:
            raise InvalidInput("the token-budget sampler got no rows; the dataset is empty")
        self.lengths = [int(n) for n in lengths]
        longest = max(range(len(self.lengths)), key=self.lengths.__getitem__)
        if self.lengths[longest] > max_tokens:
            raise InvalidInput(
                f"training row {longest} (of the training split, not a line of the file) has "
                f"{self.lengths[longest]} tokens, more than max_tokens={max_tokens}, so no batch can hold it; raise "
                "max_tokens or truncate the rows",
                row=longest,
                tokens=self.lengths[longest],
                max_tokens=max_tokens,
            )
        if min(self.lengths) < 1:
            raise InvalidInput("every row needs at least one token; drop the empty rows")
        if bucket_batches < 1 or (bucket_rows is not None and bucket_rows < 1):
            raise ConfigError(f"bucket_batches ({bucket_batches}) and bucket_rows ({bucket_rows}) must be >= 1")
        self.max_tokens = max_tokens
        # A bucket holds about `bucket_batches` full batches of rows of neighbouring lengths (many short rows, few
        # long ones): enough rows to shuffle, a narrow enough length range to pad little. `bucket_rows` fixes the
        # row count instead.
        self.bucket_batches = bucket_batches
        self.bucket_rows = bucket_rows

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = self._generator(epoch)
        tie_break = torch.randperm(len(self.lengths), generator=gen).tolist()
        by_length = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], tie_break[i]))
        stream: list[int] = []  # buckets in length order, each shuffled inside
        for bucket in self._buckets(by_length):
            stream.extend(bucket[j] for j in torch.randperm(len(bucket), generator=gen).tolist())
        # Packing runs across bucket edges (neighbouring buckets hold neighbouring lengths), so a bucket's last
        # rows fill a batch with the next bucket's first rows instead of leaving a half-empty batch.
        batches = self._pack(stream)
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[j] for j in order]

    def _buckets(self, by_length: list[int]) -> list[list[int]]:
        if self.bucket_rows is not None:
            return [by_length[i : i + self.bucket_rows] for i in range(0, len(by_length), self.bucket_rows)]
        buckets: list[list[int]] = [[]]
        tokens = 0
        for row in by_length:
            if tokens >= self.bucket_batches * self.max_tokens:
                buckets.append([])
                tokens = 0
            buckets[-1].append(row)
            tokens += self.lengths[row]
        return buckets

    def _pack(self, rows: list[int]) -> list[list[int]]:
        packed: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for row in rows:
            longest_with = max(longest, self.lengths[row])
            if current and longest_with * (len(current) + 1) > self.max_tokens:
                packed.append(current)
                current, longest_with = [], self.lengths[row]
            current.append(row)
            longest = longest_with
        if current:
            packed.append(current)
        return packed

    def padded_tokens(self, batch: Sequence[int]) -> int:
        """Tokens a batch costs once padded to its longest row."""
        return max(self.lengths[i] for i in batch) * len(batch)
