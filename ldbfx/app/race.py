"""Time to loss: training variants raced round-robin in one process, on the same batches.

A user's question is not "how much faster is a step" but "does my run reach the same loss
sooner". :func:`race` answers it on one machine: every variant (the baseline, LayerDropBack,
DropBP, ...) trains its own copy of the same model, from the same initialisation, on the same
stream of samples, for the same budget of *training* wall time. The variants take turns, a
block of steps each, so that a noisy machine (this library's CPU VMs swing +-15% between
identical rounds) slows all of them alike; evaluation is not timed. Each variant's learning rate
follows the schedule a user would set for that budget: linear warmup, then cosine, as a function
of the variant's own elapsed training time (a faster variant fits more steps into the same
schedule, as a user who knows its speed would plan).

What a method changes is measured, never assumed: FLOPs per step by ``FlopCounterMode`` and the
activation bytes saved for backward by ``saved_tensors_hooks``, on steps run after the race
with the variant's own masks (so the race's timing is untouched).

Example:
    >>> import torch, ldbfx
    >>> from ldbfx.app.race import Task, Variant, race
    >>> data = torch.randn(256, 8); target = data.sum(1, keepdim=True)
    >>> def model():
    ...     return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)], torch.nn.Linear(8, 1))
    >>> task = Task(build=model, batch=lambda i: (data[i], target[i]), n_samples=256,
    ...             loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
    ...             evaluate=lambda m: torch.nn.functional.mse_loss(m(data), target).item(),
    ...             batch_size=16, epoch_steps=4)
    >>> curves = race(task, [Variant("baseline", lr=1e-2), Variant("ldb", lr=1e-2, drop_rate=0.5)],
    ...               budget_s=0.5, evals=2)
    >>> [c.name for c in curves], len(curves[0].points) >= 2
    (['baseline', 'LayerDropBack 0.5 (kappa 1)'], True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Task", "Variant", "Curve", "race", "time_to_reach", "value_at"]

METHODS = ("baseline", "ldb", "dropbp")


@dataclass
class Task:
    """What is trained, and how it is judged.

    Args:
        build: a fresh model; called once per variant under the race's seed, so every variant
            starts from the same weights.
        batch: the batch of the given sample indices (a LongTensor), in the form ``loss`` takes.
        n_samples: the number of samples ``batch`` indexes.
        loss: the training loss of a module on a batch.
        evaluate: the validation figure of a module (called in eval mode, under no_grad).
        batch_size: the baseline's batch size (LayerDropBack's DROP epochs use ``kappa`` times it).
        epoch_steps: steps of ``batch_size`` samples in an "epoch": LayerDropBack's schedule counts
            epochs, and a time-budgeted run defines them as a number of samples.
        capture: keyword arguments of ``ldbfx.transform`` (``example_args`` / ``example_kwargs``
            for a torch.export capture).
        prepare: applied to the fresh model before the capture (LoRA: ``peft.get_peft_model``).
        higher_is_better: the validation figure is an accuracy, not a loss.
        with_replacement: samples are drawn at random with replacement (windows of a text) rather
            than by shuffled passes.
        source: the data, pinned (name, version, hash of its file list): recorded with results.
    """

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Tensor], Any]
    n_samples: int
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    batch_size: int
    epoch_steps: int
    capture: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[nn.Module], nn.Module] | None = None
    higher_is_better: bool = False
    with_replacement: bool = False
    source: str = ""


@dataclass
class Variant:
    """One contestant: a method, its options and its peak learning rate.

    ``method`` is ``"baseline"`` (the untransformed model), ``"ldb"`` (LayerDropBack) or
    ``"dropbp"``. ``kappa`` and ``period`` apply to ``"ldb"`` and to ``"baseline"`` (the
    baseline with LayerDropBack's larger batch and LR in the same epochs, and no drop: kappa's
    share of LayerDropBack's result). ``allocation`` applies to ``"dropbp"``.
    """

    method: str
    lr: float
    drop_rate: float = 0.0
    kappa: float = 1.0
    period: int = 2
    allocation: str = "uniform"
    label: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.method == "baseline":
            return "baseline" if self.kappa == 1 else f"baseline, batch x{self.kappa:g} in DROP epochs"
        if self.method == "ldb":
            return f"LayerDropBack {self.drop_rate:g} (kappa {self.kappa:g})"
        return f"DropBP {self.drop_rate:g} ({self.allocation})"


@dataclass
class Curve:
    """A variant's run: validation points and what a step cost."""

    name: str
    variant: Variant
    points: list[dict[str, float]] = field(default_factory=list)  # time_s, steps, samples, flops, value
    steps: int = 0
    train_time_s: float = 0.0
    compile_time_s: float = 0.0
    flops_per_step: dict[str, float] = field(default_factory=dict)  # "full" / "drop" -> FLOPs
    saved_bytes: dict[str, float] = field(default_factory=dict)  # "full" / "drop" -> activation bytes

    @property
    def final(self) -> float:
        return self.points[-1]["value"]


def _schedule(fraction: float, warmup: float, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` of the budget, then cosine to ``floor`` of the peak."""
    if fraction < warmup:
        return (fraction + 1e-3) / warmup
    progress = min(1.0, (fraction - warmup) / max(1e-9, 1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _Stream:
    """The same sequence of sample indices for every variant, read at its own pace."""

    def __init__(self, n: int, seed: int, with_replacement: bool, chunk: int = 4096):
        self._generator = torch.Generator().manual_seed(seed)
        self._n, self._replace, self._chunk = n, with_replacement, chunk
        self._buffer = torch.empty(0, dtype=torch.long)

    def take(self, start: int, count: int) -> torch.Tensor:
        while len(self._buffer) < start + count:
            more = (torch.randint(self._n, (self._chunk,), generator=self._generator) if self._replace
                    else torch.randperm(self._n, generator=self._generator))
            self._buffer = torch.cat([self._buffer, more])
        return self._buffer[start:start + count]


class _Runner:
    """A variant's model, optimizer, policy and place in the sample stream."""

    def __init__(self, task: Task, variant: Variant, seed: int, compile: bool, weight_decay: float):
        import ldbfx

        self.task, self.variant = task, variant
        torch.manual_seed(seed)
        model = task.build()
        if task.prepare is not None:
            model = task.prepare(model)
        self.model = model
        self.cuda = any(p.is_cuda for p in model.parameters())
        self.gm = model if variant.method == "baseline" else ldbfx.transform(model, **task.capture)
        self.net = torch.compile(self.gm) if compile else self.gm
        params = [p for p in self.gm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=variant.lr, weight_decay=weight_decay)
        self.policy = None
        if variant.method == "ldb":
            self.policy = ldbfx.LayerDropBack(self.gm, self.optimizer, drop_rate=variant.drop_rate,
                                              period=variant.period, kappa=variant.kappa, seed=seed)
        elif variant.method == "dropbp":
            self.policy = ldbfx.DropBP(self.gm, self.optimizer, drop_rate=variant.drop_rate,
                                       allocation=variant.allocation, seed=seed)
        self.curve = Curve(variant.name, variant)
        self.sample = 0  # read position in the stream
        self.epoch, self.epoch_step = -1, 0
        self.allocated = variant.allocation != "sensitivity"
        self.modes: dict[str, int] = {"full": 0, "drop": 0}

    def drop_epoch(self, epoch: int) -> bool:
        v = self.variant
        return v.kappa > 1 and epoch > 0 and epoch % v.period == 0 if v.method == "baseline" else (
            v.method == "dropbp" or (epoch > 0 and epoch % v.period == 0))

    def batch_size(self) -> int:
        v = self.variant
        scaled = v.method in ("baseline", "ldb") and v.kappa > 1 and self.drop_epoch(self.epoch)
        return int(round(self.task.batch_size * v.kappa)) if scaled else self.task.batch_size

    def _new_epoch(self) -> None:
        if self.policy is not None and self.epoch >= 0:
            self.policy.end_epoch()
        self.epoch += 1
        self.epoch_step = 0
        if self.policy is not None:
            self.policy.start_epoch(self.epoch)

    def steps_in_epoch(self) -> int:
        # An epoch is a number of samples: a batch kappa times larger makes kappa times fewer steps.
        return max(1, round(self.task.epoch_steps * self.task.batch_size / self.batch_size()))

    def step(self, stream: _Stream, lr: float) -> None:
        if self.epoch < 0 or self.epoch_step >= self.steps_in_epoch():
            self._new_epoch()
        size = self.batch_size()
        batch = self.task.batch(stream.take(self.sample, size))
        self.sample += size
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # LayerDropBack's DROP-epoch factor is applied inside optimizer.step()
        self.task.loss(self.net, batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.policy is not None:
            self.policy.step()
        self.epoch_step += 1
        self.curve.steps += 1
        self.modes["drop" if self.drop_epoch(self.epoch) else "full"] += 1

    def allocate(self, stream: _Stream) -> None:
        """DropBP's sensitivity allocation on the next training batch (its time is training time)."""
        batch = self.task.batch(stream.take(self.sample, self.task.batch_size))
        self.policy.allocate(lambda: self.task.loss(self.gm, batch))
        self.allocated = True

    def point(self) -> dict[str, float]:
        """A validation point (not timed), with where the run stands."""
        self.gm.eval()
        with torch.no_grad():
            value = float(self.task.evaluate(self.net))
        self.gm.train()
        return {"time_s": self.curve.train_time_s, "steps": self.curve.steps, "samples": self.sample,
                "value": value, **{f"{mode}_steps": n for mode, n in self.modes.items()}}


def _modes(variant: Variant) -> tuple[str, ...]:
    """The kinds of step a variant takes: full backprop, and dropping (or the larger batch)."""
    if variant.method == "dropbp":
        return ("drop",)
    return ("full", "drop") if variant.method == "ldb" or variant.kappa > 1 else ("full",)


def _enter_mode(runner: _Runner, mode: str) -> None:
    """Starts an epoch of the given kind (outside the race's timing): epoch 0 is never a DROP
    epoch, epoch ``period`` always is (for the variants that have DROP epochs)."""
    if runner.policy is not None and runner.epoch >= 0:
        runner.policy.end_epoch()
    runner.epoch = runner.variant.period if mode == "drop" else 0
    if runner.policy is not None:
        runner.policy.start_epoch(runner.epoch)


def _leave_modes(runner: _Runner) -> None:
    """Back to before the first epoch, so the race starts at epoch 0."""
    if runner.policy is not None:
        runner.policy.end_epoch()
    runner.epoch = -1


def _measure(runner: _Runner, stream: _Stream, steps: int = 4) -> None:
    """FLOPs per step and activation bytes saved for backward, per mode, with the variant's masks
    (after the race: the counting steps update nothing and advance only the policy's draws)."""
    from torch.utils.flop_counter import FlopCounterMode

    task, curve = runner.task, runner.curve
    for mode in _modes(runner.variant):
        _enter_mode(runner, mode)
        size = runner.batch_size()
        flops, saved = [], []
        for i in range(steps):
            batch = task.batch(stream.take(i * size, size))
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor):
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()  # a storage saved twice counts once
                return t

            counter = FlopCounterMode(display=False)
            with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                task.loss(runner.gm, batch).backward()
            runner.optimizer.zero_grad(set_to_none=True)
            flops.append(counter.get_total_flops())
            saved.append(sum(storages.values()))
            if runner.policy is not None:
                runner.policy.step()
        curve.flops_per_step[mode] = sum(flops) / steps
        curve.saved_bytes[mode] = sum(saved) / steps


def _warm_up(runner: _Runner, stream: _Stream) -> None:
    """Compiles every kind of step before the race: forward and backward only, so the weights
    and the optimizer state are untouched; the policy's draws advance."""
    start = time.perf_counter()
    for mode in _modes(runner.variant):
        _enter_mode(runner, mode)
        for _ in range(2):
            batch = runner.task.batch(stream.take(0, runner.batch_size()))
            runner.task.loss(runner.net, batch).backward()
            runner.optimizer.zero_grad(set_to_none=True)
            if runner.policy is not None:
                runner.policy.step()
    _leave_modes(runner)
    runner.curve.compile_time_s = time.perf_counter() - start


def _add_flops(runner: _Runner) -> None:
    """Cumulative FLOPs at each point: the steps of each kind times its measured FLOPs."""
    per = runner.curve.flops_per_step
    for point in runner.curve.points:
        steps = {mode: point.pop(f"{mode}_steps") for mode in ("full", "drop")}
        point["flops"] = sum(steps[mode] * per[mode] for mode in _modes(runner.variant))


def race(task: Task, variants: list[Variant], *, budget_s: float, seed: int = 0, evals: int = 10,
         block: int = 4, warmup: float = 0.05, compile: bool = False, weight_decay: float = 0.0,
         allocate_at: float = 0.1, on_point: Callable[[Curve], None] | None = None) -> list[Curve]:
    """Trains every variant for ``budget_s`` seconds of training time, taking turns.

    Args:
        task: the model, data, loss and validation.
        variants: the contestants; each trains its own copy of the model.
        budget_s: training wall time each variant gets (evaluation and compilation excluded).
        seed: the initialisation, the sample stream and the policies' draws.
        evals: validation points after the start (evenly spaced in each variant's own time).
        block: steps a variant runs per turn (consecutive steps keep the allocator's patterns
            realistic; the order of turns rotates each round).
        warmup: the warmup's share of the budget (then cosine to a tenth of the peak LR).
        compile: ``torch.compile`` every variant's model; the first steps (and their compile) are
            run before the race, on the variant's masks, and reported in ``compile_time_s``.
        weight_decay: AdamW's decoupled weight decay.
        allocate_at: share of the budget after which sensitivity-allocated DropBP allocates.
        on_point: called with a variant's curve after each validation point.

    Returns:
        One :class:`Curve` per variant, in the order given.
    """
    stream = _Stream(task.n_samples, seed, task.with_replacement)
    if compile:
        # Every variant's module runs the same ``forward`` code, so Dynamo's per-code cache holds
        # all their graphs (train and eval each): its default limit (8) would send the later
        # variants back to eager, silently. One process racing N models needs N times the room.
        import torch._dynamo

        limit = max(torch._dynamo.config.recompile_limit, 8 * len(variants))
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 32 * len(variants))
    runners = [_Runner(task, v, seed, compile, weight_decay) for v in variants]
    for runner in runners:
        if compile:
            _warm_up(runner, stream)
        runner.curve.points.append(runner.point())
    active = list(runners)
    turn = 0
    while active:
        order = active[turn % len(active):] + active[:turn % len(active)]
        turn += 1
        for runner in order:
            curve = runner.curve
            start = time.perf_counter()
            for _ in range(block):
                if not runner.allocated and curve.train_time_s + time.perf_counter() - start >= allocate_at * budget_s:
                    runner.allocate(stream)
                fraction = (curve.train_time_s + time.perf_counter() - start) / budget_s
                if fraction >= 1:
                    break
                runner.step(stream, runner.variant.lr * _schedule(fraction, warmup))
            if runner.cuda:
                torch.cuda.synchronize()
            curve.train_time_s += time.perf_counter() - start
            next_eval = len(curve.points) * budget_s / evals
            done = curve.train_time_s >= budget_s
            if curve.train_time_s >= next_eval or done:
                curve.points.append(runner.point())
                if on_point is not None:
                    on_point(curve)
            if done:
                active.remove(runner)
    for runner in runners:
        _measure(runner, stream)
        _add_flops(runner)
    return [r.curve for r in runners]


def value_at(curve: Curve, time_s: float) -> float:
    """The validation figure a curve had reached by ``time_s`` (its last point at or before it)."""
    reached = [p["value"] for p in curve.points if p["time_s"] <= time_s + 1e-9]
    return reached[-1] if reached else curve.points[0]["value"]


def time_to_reach(curve: Curve, target: float, higher_is_better: bool = False) -> float | None:
    """The training time of the first point at or past ``target``, else ``None``: not reached."""
    for point in curve.points:
        if (point["value"] >= target) if higher_is_better else (point["value"] <= target):
            return point["time_s"]
    return None
