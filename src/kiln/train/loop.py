"""The training loop: Accelerate for device, autocast and backward; Kiln for accumulation, resume and checkpoints.

Accelerate's own ``accumulate()`` divides the loss by the number of micro-batches, which is wrong for
variable-length data, and its dataloader wrapper hides the sampler position that an exact resume needs; so the
loop owns batching and accumulation, and asks Accelerate only for what it does well.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.errors import ConfigError, NonFiniteLoss, TrainingDiverged
from kiln.train.accumulate import Batch, LossSum, accumulate_gradients, backward_batch, count_rows
from kiln.train.checkpoint import Checkpointer, SavedCheckpoint, capture_rng, restore_rng
from kiln.train.goodput import ConsecutiveGradients, GoodputSizer, flat_gradient, observe_pair
from kiln.train.sampling import ShuffledBatchSampler, TokenBudgetBatchSampler

logger = logging.getLogger(__name__)

Sampler = ShuffledBatchSampler | TokenBudgetBatchSampler


@dataclass(frozen=True)
class StepStats:
    """What the loop reports after each optimiser step (the CLI draws its progress bar from these)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    rows: int
    batch_size: int
    samples_per_s: float
    elapsed_s: float
    eta_s: float
    tokens: int = 0  # real (unpadded) tokens of the step's rows; 0 for tabular data
    tokens_per_s: float = 0.0


def make_accelerator(device: str, mixed_precision: str) -> Any:
    """An ``accelerate.Accelerator`` for ``device`` (auto/cpu/cuda) and ``mixed_precision`` (no/bf16/fp16)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('device "cuda" was asked for, but no CUDA GPU is visible; use device = "auto" or "cpu"')
    cpu = device == "cpu" or not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise ConfigError('mixed_precision "fp16" needs a GPU, and this run is on CPU; use "bf16" or "no"')
    if not PartialState._shared_state or PartialState().num_processes == 1:
        # NOTE: Accelerate keeps its precision in a process-wide singleton and refuses a second Accelerator with a
        # different one. One process may train several models (an API user, the tests), so in a single-process run
        # the precision state is cleared first; the process group (PartialState) is left alone.
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


class _DeferredStop:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a stop never lands mid-step.

    A second signal stops at once (the default behaviour). Only installed from the main thread (Python allows
    signal handlers nowhere else); the previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("signal %d: stopping after this step (again to stop at once)", signum)

    def __enter__(self) -> _DeferredStop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Steps one model over in-memory tensors; resumable to the bit.

    ``tensors`` maps a batch key (``"x"``, ``"y"``, optionally ``"teacher"``) to a tensor whose first axis is the
    row, or ``collate(rows)`` builds a batch (variable-length rows); ``sampler`` yields row indices;
    ``loss_sum`` returns the summed loss of a micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        sampler: Sampler,
        tensors: dict[str, torch.Tensor],
        loss_sum: LossSum,
        *,
        accelerator: Any,
        grad_accum_steps: int = 1,
        count: Callable[[Batch], int] = count_rows,
        collate: Callable[[Sequence[int]], Batch] | None = None,
        sizer: GoodputSizer | None = None,
        noise_every: int = 4,
        optimizer_kind: str = "adamw",
    ) -> None:
        self.accelerator = accelerator
        # NOTE: Accelerate's optimizer wrapper and backward() matter only with a gradient scaler (fp16) or several
        # processes; in a plain run they cost ~0.4 ms a step (package look-ups on every backward), which is more
        # than a small model's whole step, so the plain run calls torch directly.
        self._world = accelerator.num_processes
        self._plain = self._world == 1 and getattr(accelerator, "scaler", None) is None
        self._backward: Callable[..., None] = torch.Tensor.backward if self._plain else accelerator.backward
        # Accelerate's autocast() builds its state object on every call; with no mixed precision it is a no-op.
        self._autocast = nullcontext if accelerator.mixed_precision == "no" else accelerator.autocast
        self._on_cpu = accelerator.device.type == "cpu"
        if self._plain:
            self.model = accelerator.prepare(model)
            self.optimizer = optimizer
        else:
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # NOTE: the module itself, not a DDP wrapper: the wrapper's own `training` flag stays True while the module
        # it wraps is in eval mode (after the workload's probe forward, or an evaluation), so checking the wrapper
        # trained every data-parallel run without dropout and with BatchNorm's running statistics
        self._module: nn.Module = accelerator.unwrap_model(self.model)
        # every module, once: train_step checks only the root's flag, and a Hugging Face encoder comes out of
        # from_pretrained in eval mode under a new root in train mode (it fine-tuned without dropout)
        self.model.train()
        self.scheduler = scheduler  # NOTE: not prepared: Accelerate would step it once per process.
        self.sampler = sampler
        self.tensors = tensors
        self.loss_sum = loss_sum
        self.grad_accum_steps = grad_accum_steps
        self.count = count
        self.collate = collate
        self.step = 0
        self._mid_step = False  # True from the first forward of a step until its optimizer update is complete
        self.last_tokens = 0  # real tokens of the last step (text: attention-mask ones; tabular: 0)
        # goodput: one sample of the gradient noise scale every noise_every steps. In one process with one
        # micro-batch a step, from the two halves of that step's batch (run as two micro-batches: the same
        # gradient, at one more forward and backward's fixed cost); otherwise from steps k and k + 1
        self.sizer = sizer
        self.noise_every = noise_every
        self.optimizer_kind = optimizer_kind
        self._one_batch_steps = self._world == 1 and grad_accum_steps == 1
        self._split_for_noise = sizer is not None and self._one_batch_steps
        self._gradient_pairs = (
            ConsecutiveGradients(sizer.noise, noise_every) if sizer is not None and not self._split_for_noise else None
        )
        self._lr_factor = 1.0  # the sizer's lr multiplier applied at the last step

    def _batch(self, rows: Sequence[int]) -> Batch:
        if self.collate is not None:  # variable-length rows: padded per batch
            batch = self.collate(rows)
        else:
            index = torch.as_tensor(rows, dtype=torch.long)
            # index_select, not v[index]: advanced indexing took 1.5 µs more for 32 rows of 64 floats (ad hoc timing)
            batch = {k: torch.index_select(v, 0, index) for k, v in self.tensors.items()}
        if self._on_cpu:
            return batch
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}

    def _global_count(self, local: int) -> int:
        if self._world == 1:
            return local
        return int(self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), reduction="sum"))

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _halves_for_noise(self, window: list[list[int]]) -> list[list[int]] | None:
        """The step's batch cut into two equal halves when this step samples the noise scale from them."""
        if not self._split_for_noise or self.step % self.noise_every != 0:
            return None
        rows = list(window[0])
        if len(rows) < 2 or len(rows) % 2:
            return None  # an odd batch (an epoch's short last one) is not sampled
        half = len(rows) // 2
        return [rows[:half], rows[half:]]

    def _no_sync(self) -> Any:
        return self.accelerator.no_sync(self.model)

    def _rank_share(self, window: list[list[int]]) -> tuple[list[Batch], set[int]]:
        """This rank's micro-batches of the global ``window``, and the ids of those it runs at zero weight.

        A batch of fewer rows than ranks (an epoch's short last one, a long text alone in its token budget) leaves
        some ranks no share. They run its first row at zero weight: every rank still joins the gradient all-reduce,
        and the window's gradient is its real rows' alone.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        micro, ghost_ids = [], set()
        for rows in window:
            share = rows[rank::world]
            batch = self._batch(share or rows[:1])
            if not share:
                ghost_ids.add(id(batch))
            micro.append(batch)
        return micro, ghost_ids

    def train_step(self) -> tuple[float, int]:
        """One optimiser step over the next ``grad_accum_steps`` micro-batches: ``(mean loss, rows)``."""
        self._mid_step = True
        window = self.sampler.next_window(self.grad_accum_steps)
        halves = self._halves_for_noise(window)
        if not self._module.training:  # after an evaluation; train() walks every module, 6% of a small step
            self.model.train()
        if self._one_batch_steps and halves is None:
            loss = self._backward_batch(window[0])
        else:
            loss = self._backward_window(window, halves)
        self.optimizer.step()
        self.scheduler.step()
        if self.sizer is not None:  # AdaScale's gain moves with the noise scale: the next step's lr follows
            self._lr_factor = self.sizer.lr_factor(self.optimizer_kind)
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self._lr_factor
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._mid_step = False
        return loss, sum(len(rows) for rows in window)

    def _backward_batch(self, rows: Sequence[int]) -> float:
        """The gradient of one batch's mean loss, in one process: the common step, without the window's bookkeeping
        for ranks, accumulation and noise samples (about 11 µs a step, 1.8% of a 64-128-128-10 MLP's step at 32
        rows, in ad-hoc timings beside ``bench/train_overhead.py``'s loops)."""
        batch = self._batch(rows)
        if "attention_mask" in batch:
            self.last_tokens = int(batch["attention_mask"].sum())
        return backward_batch(self.model, batch, self.loss_sum, self.count, self._backward, self._autocast)

    def _backward_window(self, window: list[list[int]], halves: list[list[int]] | None) -> float:
        """The gradient of the window's mean loss in ``.grad`` (this rank's share of it under data parallelism);
        with ``halves``, the step's batch runs as two halves and their gradients give a noise-scale sample."""
        ghost_ids: set[int] = set()  # micro-batches this rank runs at zero weight; none in one process
        if self._world > 1:  # every rank sees the global batch and takes its share
            micro, ghost_ids = self._rank_share(window)
        else:
            micro = [self._batch(rows) for rows in halves or window]
        if "attention_mask" in micro[0]:
            local_tokens = sum(int(b["attention_mask"].sum()) for b in micro if id(b) not in ghost_ids)
            self.last_tokens = self._global_count(local_tokens)
        loss_sum, count = self.loss_sum, self.count
        if ghost_ids:

            def count(batch: Batch) -> int:
                return 0 if id(batch) in ghost_ids else self.count(batch)

            def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
                loss = self.loss_sum(model, batch)
                return loss * 0.0 if id(batch) in ghost_ids else loss

        first_half: list[torch.Tensor] = []  # with halves: the gradient after the first half's backward

        def keep_first_half(micro_batch: int) -> None:
            if micro_batch == 0:
                first_half.append(flat_gradient(self._grads()))

        result = accumulate_gradients(
            self.model,
            micro,
            loss_sum,
            count=count,
            backward=self._backward,
            autocast=self._autocast,
            no_sync=self._no_sync,
            global_count=self._global_count,
            world_size=self._world,
            after_backward=keep_first_half if halves else None,
        )
        loss = result.loss  # this rank's share of the window's mean loss: the ranks' shares add up to it
        if self._world > 1:
            loss = float(self.accelerator.reduce(torch.tensor(loss, device=self.accelerator.device), reduction="sum"))
            if not math.isfinite(loss):  # every rank sees the same sum, so all stop here, before the update
                raise NonFiniteLoss(f"the loss summed over the {self._world} ranks is {loss}")
        count_a = self.count(micro[0]) if halves else 0
        if halves is not None and self.sizer is not None and 0 < count_a < result.count:
            # .grad after half a is (count_a / count)·G_a; after both, G = (count_a·G_a + count_b·G_b) / count
            whole, part_a = flat_gradient(self._grads()), first_half[0]
            count_b = result.count - count_a
            observe_pair(
                self.sizer.noise,
                part_a * (result.count / count_a),
                (whole - part_a).mul_(result.count / count_b),
                len(halves[0]),
            )
        elif self._gradient_pairs is not None:  # the all-reduced gradient of the window's mean loss
            self._gradient_pairs.observe(self.step, result.count, self._grads())
        return loss

    def _adapt_batch(self) -> None:
        """After a step: let the sizer pick the batch size from the next step on (mid-epoch too).

        With several processes, rank 0's sizer decides and the others follow: each rank measures its own
        throughput, and ranks that chose differently would step through different batches and lrs.
        """
        if self.sizer is None or not isinstance(self.sampler, ShuffledBatchSampler) or not self.sizer.due():
            return
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            proposal = self.sizer.decide(self.step) if self.accelerator.is_main_process else 0
            chosen = int(broadcast(torch.tensor([proposal], device=self.accelerator.device), from_process=0).item())
            self.sizer.follow(chosen)
        else:
            chosen = self.sizer.decide(self.step)
        if chosen != self.sampler.batch_size:
            self.sampler.set_batch_size(chosen)
            factor = self.sizer.lr_factor(self.optimizer_kind)
            for group in self.optimizer.param_groups:  # the next step already runs at the new batch's lr
                group["lr"] = group["lr"] * factor / self._lr_factor
            self._lr_factor = factor

    def fit(
        self,
        total_steps: int,
        *,
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 0,
        extra_state: Callable[[], dict[str, Any]] = dict,
        on_step: Callable[[StepStats], None] | None = None,
        stop_at_epoch: int | None = None,
        resumed_from: SavedCheckpoint | None = None,
    ) -> SavedCheckpoint | None:
        """Train until ``total_steps``, checkpointing every ``checkpoint_every`` steps and at exit.

        At exit means: at the end; on SIGINT/SIGTERM (deferred to the end of the running step, then
        ``KeyboardInterrupt`` is raised); and on an error between steps. An error inside a step (its state is
        half-done) and a NaN/inf loss keep the last checkpoint as the one to resume from; for the latter
        :class:`TrainingDiverged` names it. ``stop_at_epoch`` (adaptive batch size, where the steps per epoch
        change) also ends the run when that epoch is reached; ``total_steps`` is then a cap and the ETA estimate.
        ``resumed_from`` is the checkpoint this trainer's state was loaded from (``None``: a fresh start): the last
        good checkpoint until the loop writes one.
        """
        # NOTE: not checkpointer.latest(): a resume from an explicit file may start behind the pointer (or beside
        # a corrupt one), and a stop must then still write its steps, a divergence name the file resumed from
        last = resumed_from
        started, done_at_start = time.perf_counter(), self.step
        smoothed_rate = token_rate = 0.0
        try:
            with _DeferredStop() as stop:
                while self.step < total_steps and (stop_at_epoch is None or self.sampler.epoch < stop_at_epoch):
                    t0 = time.perf_counter()
                    loss, rows = self.train_step()
                    step_s = max(time.perf_counter() - t0, 1e-9)
                    full = isinstance(self.sampler, ShuffledBatchSampler) and rows == self.sampler.batch_size
                    if self.sizer is not None and full:  # an epoch's short last batch is not typical
                        self.sizer.observe_throughput(rows, rows / step_s)
                    self._adapt_batch()
                    smoothed_rate = rows / step_s if not smoothed_rate else 0.9 * smoothed_rate + 0.1 * rows / step_s
                    tokens = self.last_tokens
                    token_rate = tokens / step_s if not token_rate else 0.9 * token_rate + 0.1 * tokens / step_s
                    periodic = checkpoint_every and self.step % checkpoint_every == 0 and self.step < total_steps
                    if checkpointer and periodic:
                        last = self._save(checkpointer, extra_state)
                    if on_step is not None:
                        elapsed = time.perf_counter() - started
                        on_step(
                            StepStats(
                                step=self.step,
                                total_steps=total_steps,
                                epoch=self.sampler.epoch,
                                loss=loss,
                                lr=float(self.optimizer.param_groups[0]["lr"]),
                                rows=rows,
                                batch_size=getattr(self.sampler, "batch_size", rows),
                                samples_per_s=smoothed_rate,
                                elapsed_s=elapsed,
                                eta_s=elapsed / (self.step - done_at_start) * (total_steps - self.step),
                                tokens=tokens,
                                tokens_per_s=token_rate,
                            )
                        )
                    if stop.signal is not None:
                        raise KeyboardInterrupt(f"signal {stop.signal}")
        except NonFiniteLoss as exc:
            # NOTE: warmup ramps the lr over steps 0..warmup_steps only: more of it helps a resume from step k only
            # when warmup_steps > k
            advice = (
                f'the last good checkpoint is "{last.path}" (step {last.step}); resume from it with a lower lr, or '
                f"with warmup_steps above {last.step} to ramp the lr up again from there (both may change on resume)"
                if last
                else "no checkpoint exists; start again with a lower lr or more warmup_steps"
            )
            raise TrainingDiverged(
                f"training stopped at step {self.step + 1}: {exc.message}; the weights were not updated with it and "
                f"{advice}, or check the data for extreme values",
                step=self.step + 1,
                checkpoint=str(last.path) if last else None,
            ) from exc
        except BaseException:
            if checkpointer:
                self._save_on_exit(checkpointer, last, extra_state)
            raise
        if checkpointer:
            last = self._save(checkpointer, extra_state)
        return last

    def _save_on_exit(
        self, checkpointer: Checkpointer, last: SavedCheckpoint | None, extra_state: Callable[[], dict[str, Any]]
    ) -> None:
        if self._mid_step:
            if self.accelerator.is_main_process:
                logger.warning("stopped inside step %d; the last checkpoint (%s) stands", self.step + 1, last)
            return
        if self.step == 0 or (last is not None and last.step >= self.step):
            return  # nothing newer than what is on disk
        saved = self._save(checkpointer, extra_state)
        if self.accelerator.is_main_process:
            logger.warning("stopped at step %d; checkpoint written to %s", self.step, saved.path)

    def _save(self, checkpointer: Checkpointer, extra_state: Callable[[], dict[str, Any]]) -> SavedCheckpoint:
        """Rank 0 writes the checkpoint; every other rank its own RNG states at the same step beside it."""
        rank = self.accelerator.process_index
        if rank:
            return checkpointer.save_rank_rng(self.step, rank)
        return checkpointer.save(self.step, self.state_dict() | extra_state())

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "trainer": {"step": self.step},
            "sizer": self.sizer.state_dict() if self.sizer is not None else None,
            "scaler": scaler.state_dict() if (scaler := getattr(self.accelerator, "scaler", None)) else None,
            "rng": capture_rng(),
        }

    def trained_model(self) -> nn.Module:
        """The model as it is evaluated and exported: without the DDP wrapper and without the autocast Accelerate
        wraps its forward in for mixed precision (a graph traced through that holds bf16 casts ONNX Runtime
        cannot run), on the CPU, in float32. For after training: the autocast comes off the trainer's model too."""
        model: nn.Module = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return model.to("cpu").float()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a saved state; the lr from here on is this trainer's schedule (lr and warmup may change on resume)."""
        base_lrs = list(self.scheduler.base_lrs)  # this run's lr: the saved state holds the old run's
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = base_lrs
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["trainer"]["step"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):  # fp16: the loss scale it had found, not the default again
            scaler.load_state_dict(state["scaler"])
        if self.sizer is not None and state.get("sizer"):
            self.sizer.load_state_dict(state["sizer"])
            self._lr_factor = self.sizer.lr_factor(self.optimizer_kind)  # what the saved lr already holds
        step, last_lrs = self.scheduler.last_epoch, self.scheduler.get_last_lr()
        groups = self.optimizer.param_groups
        for group, base, lr_at, saved in zip(groups, base_lrs, self.scheduler.lr_lambdas, last_lrs, strict=True):
            # NOTE: no state holds the lr lambdas (warmup_steps), and the saved lr would run the next step
            scheduled = base * lr_at(step)
            group["initial_lr"] = base
            if scheduled != saved:  # lr or warmup_steps changed; otherwise the saved lr stands, to the bit
                group["lr"] = scheduled * self._lr_factor
        restore_rng(state["rng"])
