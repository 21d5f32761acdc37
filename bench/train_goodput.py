"""Bar of issue 4: a goodput-sized batch reaches a held-out accuracy >= 1.3x sooner than the best fixed batch.

Ways to train the same model on the same data through Kiln's ``Trainer``, constant lr (no lr schedule):

  fixed-<B>   three fixed batch sizes, each at lr(B) = ``--lr`` x sqrt(B / ``--base-batch``) (the square-root
              rule for Adam; ``--lr-rule linear`` for SGD); ``--lr-grid`` additionally tries each fixed size at
              these multiples of its rule lr and keeps the fastest, so a fixed baseline is tuned, not guessed
  adaptive    starts at ``--start`` rows at lr(``--start``); the goodput sizer moves the batch (up to
              ``--max-batch``, at any step) to the size with the most progress per second, measured or predicted
              from a step-time line over the measured sizes; the lr follows AdaScale's
              gain (square root of it for Adam: between 1 and the rule's factor; ``--lr-scaling rule`` for the
              rule); tuned over the same ``--lr-grid`` as the fixed sizes, its fastest kept
  schedule    hand-written batch schedules (``--schedules``, e.g. ``16>64@5``: 16 rows, 64 from step 5), lr by the
              rule at each size, tuned over the same grid: the best two of 11 tried in ad-hoc runs of this very
              test, a yardstick for the sizer from hindsight (not a bound: a schedule outside them can be faster)

Each run records a time-to-accuracy curve: held-out accuracy at every ``--eval-every-s`` seconds of *training*
time (the evaluation itself is off the clock) until ``--budget-s``. Configs take turns within each round,
``--rounds`` tuning rounds, one seed per round; the first table gives each config's median time to ``--target`` (a
round that never reaches it counts as infinitely slow), and each family's fastest lr is its pick. A pick is the
best of four noisy medians, so its time is biased low, and the fixed side picks the best of twelve against the
sizer's four: the ratio of two picks favours whichever side had more draws. So the picks (best fixed, adaptive,
best schedule) run again on ``--held-out-rounds`` fresh seeds, and the bar's ratio, best fixed / adaptive, is the
ratio of their medians there, with a 90% paired-bootstrap interval over those rounds. Writes JSON and an HTML page
with the median curves of each family's fastest (tuning rounds).

    python bench/train_goodput.py      # the reported run: digits CNN, everything tuned over lr x1/x2/x3/x4
    python bench/train_goodput.py --dataset synthetic --model mlp --hidden 512,512 --lr 1e-3 \
        --fixed 32,128,512 --start 64 --max-batch 1024 --budget-s 6 --eval-every-s 0.05 --target 0.88
"""

from __future__ import annotations

import argparse
import contextlib
import html
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kiln._utils import atomic_write_text, package_versions, write_result
from kiln.bench.report import _CSS, _figure, _inline, _svg
from kiln.train import TrainSettings
from kiln.train.goodput import GoodputSizer
from kiln.train.loop import StepStats, Trainer, make_accelerator
from kiln.train.optim import make_optimizer
from kiln.train.workload import prepare_workload


@dataclass
class Curve:
    """One run: held-out accuracy against training seconds, and the batch size at each evaluation."""

    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def time_to(self, target: float) -> float:
        return next((s for s, a in zip(self.seconds, self.accuracy, strict=True) if a >= target), math.inf)


class _BudgetSpent(Exception):
    pass


def lr_for(batch: int, args: argparse.Namespace) -> float:
    ratio = batch / args.base_batch
    return float(args.lr * (ratio if args.lr_rule == "linear" else math.sqrt(ratio)))


class ScheduledSizer(GoodputSizer):
    """A fixed batch-size schedule through the sizer's hooks: ``[(0, 16), (5, 64)]`` = 16 rows, 64 from step 5.

    The lr follows ``--lr-rule`` at each size (the fixed sizes' rule), so a schedule differs from a fixed size
    only in when it changes.
    """

    def __init__(self, schedule: Sequence[tuple[int, int]], lr_rule: str) -> None:
        super().__init__(base_batch=schedule[0][1], max_batch=max(b for _, b in schedule))
        self.schedule, self.lr_rule = list(schedule), lr_rule

    def due(self) -> bool:
        return True

    def decide(self, step: int) -> int:
        self.current = [batch for start, batch in self.schedule if step >= start][-1]
        return self.current

    def lr_factor(self, optimizer: str) -> float:
        ratio = self.current / self.base_batch
        return ratio if self.lr_rule == "linear" else math.sqrt(ratio)


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """``"16>32@5>64@15"`` -> ``[(0, 16), (5, 32), (15, 64)]``."""
    first, *rest = text.split(">")
    schedule = [(0, int(first))]
    for part in rest:
        batch, _, start = part.partition("@")
        schedule.append((int(start), int(batch)))
    if [s for s, _ in schedule] != sorted({s for s, _ in schedule}):
        raise SystemExit(f"--schedules: {text!r} must start at step 0 and rise, like 16>64@5")
    return schedule


def run(
    batch: int,
    lr: float,
    adaptive: bool,
    seed: int,
    args: argparse.Namespace,
    schedule: Sequence[tuple[int, int]] | None = None,
) -> Curve:
    settings = TrainSettings(
        dataset=args.data_path,
        target="target" if args.dataset == "synthetic" else "",
        model=args.model,
        hidden_sizes=args.hidden,
        optimizer=args.optimizer,
        lr=lr,
        batch_size=batch,
        seed=seed,
        track=False,
        export=False,
    )
    work = prepare_workload(settings, None)
    optimizer = make_optimizer(work.model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sizer: GoodputSizer | None = None
    if schedule is not None:
        sizer = ScheduledSizer(schedule, args.lr_rule)
    elif adaptive:
        sizer = GoodputSizer(base_batch=batch, max_batch=args.max_batch, lr_scaling=args.lr_scaling)
    trainer = Trainer(
        work.model,
        optimizer,
        scheduler,
        work.sampler,
        work.tensors,
        work.loss_sum,
        accelerator=make_accelerator("cpu", "no"),
        sizer=sizer,
        noise_every=args.noise_every if schedule is None else 10**9,  # a schedule needs no noise scale
        optimizer_kind=args.optimizer,
    )
    curve = Curve()
    off_clock = 0.0  # seconds spent evaluating, taken off the training clock
    started = time.perf_counter()

    def evaluate(train_s: float) -> None:
        nonlocal off_clock
        t0 = time.perf_counter()
        accuracy = work.evaluate(trainer.model)["test_accuracy"]
        curve.seconds.append(train_s)
        curve.accuracy.append(accuracy)
        curve.batch_size.append(int(trainer.sampler.batch_size) if hasattr(trainer.sampler, "batch_size") else 0)
        off_clock += time.perf_counter() - t0

    def on_step(stats: StepStats) -> None:
        train_s = time.perf_counter() - started - off_clock
        if train_s >= len(curve.seconds) * args.eval_every_s:
            evaluate(train_s)
        if train_s >= args.budget_s:
            raise _BudgetSpent

    evaluate(0.0)
    with contextlib.suppress(_BudgetSpent):  # on_step ends the run when the budget is spent
        trainer.fit(10**9, on_step=on_step)
    curve.changes = sizer.changes if sizer else []
    return curve


def synthetic_csv(directory: Path, rows: int) -> Path:
    """A local classification set from ``sklearn.datasets.make_classification`` (fixed seed), as a CSV file."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows, n_features=40, n_informative=24, n_redundant=8, n_classes=8, flip_y=0.02, random_state=0
    )
    path = directory / "synthetic.csv"
    lines = [",".join([*(f"f{i}" for i in range(x.shape[1])), "target"])]
    lines += [",".join([*(f"{v:.6g}" for v in row), str(label)]) for row, label in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class Verdict:
    """The race's figures for the page: the bar's ratio and its interval, the schedule's, the tuning rounds'."""

    ratio: float
    interval: tuple[float, float]
    headroom: float
    tuning_ratio: float
    where: str


def median_times(curves: dict[str, list[Curve]], target: float) -> dict[str, float]:
    """Each config's median over rounds of the training seconds to ``target`` (inf: never reached)."""
    return {name: statistics.median([c.time_to(target) for c in runs]) for name, runs in curves.items()}


def ratio_interval(
    fixed: Sequence[Curve], adaptive: Sequence[Curve], target: float, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """90% paired-bootstrap interval of median(fixed) / median(adaptive) over rounds (round i of each shares a
    seed: its data order and initial weights), so how much one ratio can be trusted is on the page beside it."""
    a = np.array([c.time_to(target) for c in fixed])
    b = np.array([c.time_to(target) for c in adaptive])
    picks = np.random.default_rng(seed).integers(0, len(a), size=(draws, len(a)))
    with np.errstate(invalid="ignore"):  # inf / inf: both never reached in a draw; left out
        ratios = np.median(a[picks], axis=1) / np.median(b[picks], axis=1)
    low, high = np.nanpercentile(ratios, [5, 95])
    return float(low), float(high)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def median_curve(curves: Sequence[Curve], grid: np.ndarray[Any, Any]) -> list[float]:
    """The median over runs of each run's accuracy at each grid time (step interpolation: the last evaluation)."""
    at = []
    for curve in curves:
        index = np.searchsorted(np.asarray(curve.seconds), grid, side="right") - 1
        at.append(np.asarray(curve.accuracy)[np.clip(index, 0, None)])
    return [float(v) for v in np.median(np.stack(at), axis=0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help='a bundled dataset, or "synthetic" (generated here)')
    parser.add_argument("--synthetic-rows", type=int, default=20_000)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--hidden", default="16,32", help="hidden widths (mlp) or channels (cnn)")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lr", type=float, default=4e-3, help="the lr at --base-batch rows")
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--lr-rule", default="sqrt", choices=("sqrt", "linear"))
    parser.add_argument(
        "--lr-grid",
        default="1,2,3,4",
        help="multiples of the rule lr tried for each config (each was fastest at x1-x4 on 2026-11-23, never x0.5)",
    )
    parser.add_argument("--fixed", default="16,64,256")
    parser.add_argument("--start", type=int, default=16)
    parser.add_argument(
        "--schedules",
        default="16>64@5,16>32@5>64@15",
        help='hand-written batch schedules, comma-separated ("16>64@5": 16 rows, 64 from step 5); "" for none',
    )
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--lr-scaling", default="adascale", choices=("adascale", "rule"), help="the sizer's lr gain")
    parser.add_argument("--noise-every", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--budget-s", type=float, default=1.2)
    parser.add_argument("--eval-every-s", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=11, help="tuning rounds: they pick each family's lr")
    parser.add_argument(
        "--held-out-rounds",
        type=int,
        default=11,
        help="rounds on fresh seeds that re-run the picks; the bar's ratio comes from them (0: from the tuning rounds)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_goodput.json"))
    parser.add_argument("--html", type=Path, default=Path("bench/results/train_goodput.html"))
    args = parser.parse_args()
    args.hidden = tuple(int(h) for h in args.hidden.split(","))
    torch.set_num_threads(args.threads)
    grid_factors = [float(f) for f in args.lr_grid.split(",")]

    # each family (a fixed size, or the sizer from --start) at every lr of the grid; a family's fastest is kept
    schedules = {f"schedule {text}": parse_schedule(text) for text in args.schedules.split(",") if text}
    families: list[tuple[str, int, bool, list[tuple[int, int]] | None]]
    families = [(f"fixed-{b}", int(b), False, None) for b in args.fixed.split(",")]
    families += [("adaptive", args.start, True, None)]
    families += [(name, schedule[0][1], False, schedule) for name, schedule in schedules.items()]
    configs: dict[str, dict[str, Any]] = {}
    for family, batch, sized, schedule in families:
        for factor in grid_factors:
            suffix = "" if len(grid_factors) == 1 else f" lr x{factor:g}"
            lr = lr_for(batch, args) * factor
            configs[family + suffix] = {
                "family": family,
                "batch": batch,
                "lr": lr,
                "adaptive": sized,
                "schedule": schedule,
            }

    curves: dict[str, list[Curve]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        args.data_path = (
            str(synthetic_csv(data_dir, args.synthetic_rows)) if args.dataset == "synthetic" else args.dataset
        )
        run(args.start, lr_for(args.start, args), True, 10_000, args)  # warm-up: imports, allocator, caches
        for seed in range(args.rounds):
            for name, config in configs.items():
                curves[name].append(
                    run(config["batch"], config["lr"], config["adaptive"], seed, args, config["schedule"])
                )
        times = median_times(curves, args.target)
        fastest: dict[str, str] = {}  # family -> its fastest lr variant
        for name, config in configs.items():
            best = fastest.get(config["family"])
            fastest[config["family"]] = name if best is None or times[name] < times[best] else best
        adaptive = fastest.pop("adaptive")
        scheduled = [fastest.pop(name) for name in schedules]
        best_schedule = min(scheduled, key=times.__getitem__) if scheduled else None
        shown = [*fastest.values(), adaptive, *([best_schedule] if best_schedule else [])]
        best_fixed = min(fastest.values(), key=times.__getitem__)
        picks = [best_fixed, adaptive, *([best_schedule] if best_schedule else [])]
        held_out: dict[str, list[Curve]] = {name: [] for name in picks}
        for seed in range(args.rounds, args.rounds + args.held_out_rounds):  # seeds the tuning never saw
            for name in picks:
                config = configs[name]
                held_out[name].append(
                    run(config["batch"], config["lr"], config["adaptive"], seed, args, config["schedule"])
                )

    tuning_ratio = times[best_fixed] / times[adaptive]
    judged = held_out if args.held_out_rounds else {name: curves[name] for name in picks}
    held_times = median_times(judged, args.target)
    ratio = held_times[best_fixed] / held_times[adaptive]
    interval = ratio_interval(judged[best_fixed], judged[adaptive], args.target)
    headroom = held_times[best_fixed] / held_times[best_schedule] if best_schedule else math.nan
    grid = np.linspace(0.0, args.budget_s, 200)
    medians = {name: median_curve(curves[name], grid) for name in configs}

    console = Console(width=140)  # piped to a file, rich would cut the table at 80 columns
    task = f"{args.dataset} {args.model} {list(args.hidden)}, {args.optimizer}"
    table = Table(title=f"{task}: training seconds to held-out accuracy >= {args.target} (median of {args.rounds})")
    for column in ("config", "batch", "lr", "time to target", "reached", "final acc"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for name, config in configs.items():
        runs = curves[name]
        reached = sum(math.isfinite(c.time_to(args.target)) for c in runs)
        sizes = f"{args.start}->{args.max_batch}" if config["adaptive"] else str(config["batch"])
        if config["schedule"]:
            sizes = ">".join(str(b) for _, b in config["schedule"])
        final = statistics.median(c.accuracy[-1] for c in runs)
        mark = " *" if name in (best_fixed, adaptive, best_schedule) else ""
        table.add_row(
            name + mark, sizes, f"{config['lr']:.2g}", f"{times[name]:.3f}s", f"{reached}/{len(runs)}", f"{final:.3f}"
        )
    console.print(table)
    console.print(f"tuning rounds, best fixed / best adaptive: {tuning_ratio:.2f}x (each side's pick biased low)")
    where = f"{args.held_out_rounds} held-out rounds" if args.held_out_rounds else f"the {args.rounds} tuning rounds"
    held = Table(title=f"the picks on {where}: training seconds to {args.target}")
    for column in ("config", "time to target", "reached", "rounds (s)"):
        held.add_column(column, justify="left" if column == "config" else "right")
    for name in picks:
        runs = judged[name]
        reached = sum(math.isfinite(c.time_to(args.target)) for c in runs)
        spread = sorted(c.time_to(args.target) for c in runs)
        held.add_row(name, f"{held_times[name]:.3f}s", f"{reached}/{len(runs)}", f"{spread[0]:.3f}-{spread[-1]:.3f}")
    console.print(held)
    reached_ratio = math.isfinite(held_times[adaptive])
    verdict = "reached" if ratio >= 1.3 else "missed" if reached_ratio else "adaptive never got there"
    console.print(
        f"best fixed ({best_fixed}) / best adaptive ({adaptive}), time to {args.target}, {where}: {ratio:.2f}x, "
        f"90% interval {interval[0]:.2f}-{interval[1]:.2f} (bar >= 1.3x: {verdict})"
    )
    if best_schedule:
        console.print(
            f"best fixed / best hand-written schedule ({best_schedule}), picked with hindsight: {headroom:.2f}x"
        )
    for change in curves[adaptive][0].changes:
        console.print(
            f"  round 0 {adaptive}: step {change['step']} batch {change['from']} -> {change['to']}, "
            f"noise scale {change['noise_scale']:.0f}"
        )

    payload = {
        "settings": {
            k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        "configs": configs,
        "time_to_target_s": {n: (t if math.isfinite(t) else None) for n, t in times.items()},
        "best_fixed": best_fixed,
        "best_adaptive": adaptive,
        "best_schedule": best_schedule,
        "tuning_ratio_best_fixed_over_adaptive": _finite(tuning_ratio),
        "held_out": {
            "seeds": list(
                range(args.rounds, args.rounds + args.held_out_rounds) if args.held_out_rounds else range(args.rounds)
            ),
            "time_to_target_s": {n: _finite(t) for n, t in held_times.items()},
            "rounds_time_to_target_s": {n: [_finite(c.time_to(args.target)) for c in rs] for n, rs in judged.items()},
        },
        "ratio_best_fixed_over_adaptive": _finite(ratio),
        "ratio_90ci": list(interval),
        "ratio_best_fixed_over_best_schedule": _finite(headroom),
        "curves": {
            n: [
                {"seconds": c.seconds, "accuracy": c.accuracy, "batch_size": c.batch_size, "changes": c.changes}
                for c in runs
            ]
            for n, runs in curves.items()
        },
        "processor": platform.processor(),
    }
    write_result(args.json, payload, ("torch", "accelerate", "kiln"))
    verdicts = Verdict(ratio, interval, headroom, tuning_ratio, where)
    atomic_write_text(args.html, page(task, args, shown, times, grid, medians, curves, verdicts, best_fixed, adaptive))
    console.print(f"wrote {args.json} and {args.html}")


def page(
    task: str,
    args: argparse.Namespace,
    shown: Sequence[str],
    times: dict[str, float],
    grid: np.ndarray[Any, Any],
    medians: dict[str, list[float]],
    curves: dict[str, list[Curve]],
    verdict: Verdict,
    best_fixed: str,
    adaptive: str,
) -> str:
    esc = html.escape
    schedule_line = (
        "Best fixed / the best hand-written schedule, picked with hindsight from runs of this very test: "
        f"{verdict.headroom:.2f}x."
        if math.isfinite(verdict.headroom)
        else ""
    )
    figure = _figure()
    accuracy_axes = figure.add_subplot()
    for name in shown:
        label = f"{name} ({times[name]:.2f}s)" if math.isfinite(times[name]) else f"{name} (not reached)"
        accuracy_axes.plot(grid, medians[name], label=label, linewidth=2 if name == adaptive else 1.2)
    accuracy_axes.axhline(args.target, color="grey", linestyle="--", linewidth=1, label=f"target {args.target}")
    low = min(min(medians[n][len(grid) // 10 :]) for n in shown)
    accuracy_axes.set_ylim(max(0.0, min(low, args.target - 0.05)), 1.0)
    accuracy_axes.set_xlabel("training seconds (evaluation off the clock)")
    accuracy_axes.set_ylabel("held-out accuracy (median over rounds)")
    accuracy_axes.set_title("Time to accuracy: fixed batch sizes, the goodput sizer, a schedule")
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize="small", loc="lower right")
    batch_figure = _figure()
    batch_axes = batch_figure.add_subplot()
    for i, curve in enumerate(curves[adaptive]):
        batch_axes.step(curve.seconds, curve.batch_size, where="post", alpha=0.7, label=f"round {i}")
    batch_axes.set_yscale("log", base=2)
    batch_axes.set_xlabel("training seconds")
    batch_axes.set_ylabel("batch size (rows)")
    batch_axes.set_title("The goodput sizer's batch size")
    batch_axes.grid(alpha=0.3)
    batch_axes.legend(fontsize="small")
    rows = "".join(
        f"<tr><td>{esc(n)}</td><td>{times[n]:.3f}</td></tr>"
        if math.isfinite(times[n])
        else f"<tr><td>{esc(n)}</td><td>not reached</td></tr>"
        for n in times
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln: goodput batch size</title>
<style>{_CSS}</style></head>
<body>
<h1>Goodput batch size vs fixed batch sizes: {esc(task)}</h1>
<p>Median over {args.rounds} tuning rounds of training seconds to held-out accuracy &ge; {args.target}; each
family's fastest lr is its pick (tuning ratio {verdict.tuning_ratio:.2f}x, biased by the picks). On
{esc(verdict.where)}, best fixed ({esc(best_fixed)}) / best adaptive ({esc(adaptive)}):
<strong>{verdict.ratio:.2f}x</strong>, 90% interval {verdict.interval[0]:.2f}-{verdict.interval[1]:.2f}
(bar &ge; 1.3x). {schedule_line}</p>
<table><thead><tr><th>config</th><th>seconds to target</th></tr></thead><tbody>{rows}</tbody></table>
<div class="plots"><figure>{_svg(figure)}</figure><figure>{_svg(batch_figure)}</figure></div>
<h2>Context</h2>
<pre>settings: {esc(_inline(vars(args)))}
versions: {esc(_inline(package_versions("torch", "accelerate", "kiln")))}
machine: {esc(platform.platform())}</pre>
</body></html>
"""


if __name__ == "__main__":
    main()
