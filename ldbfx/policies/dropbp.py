"""DropBP as a policy: which residual branches skip their whole backward at each step.

The rules (../shared/METHODS.md §4, Woo et al., NeurIPS 2024):

* **Selection.** At every optimizer step each eligible branch (:func:`ldbfx.branches`) is dropped
  independently with its rate: its output is detached in the backward, so neither dX nor dW is
  computed inside it (:func:`ldbfx.set_dropped_branches`). There are no full epochs and no batch
  or LR scaling: the forward is unchanged and every step drops.
* **Rates.** ``allocation="uniform"``: every branch at ``drop_rate``. ``"sensitivity"``: call
  :meth:`DropBP.allocate` once (the paper: at about 10% of training) with a closure computing the
  loss of one batch. It measures, per branch, the squared L2 distance between the full gradient
  and the gradient with that branch alone dropped (the sensitivity ``s_i``) and the backward
  FLOPs dropping it saves (``f_i``, counted by ``FlopCounterMode``: no FLOPs to supply). Rates
  then rise greedily in steps of ``step`` (0.1), each step going to the branch whose expected
  gradient error per FLOP saved, ``s_i / f_i``, is smallest (a priority queue; the error model
  is linear in the rate, ``p_i * s_i``), up to ``max_rate``, until the expected saving
  ``sum p_i f_i`` reaches ``drop_rate * sum f_i``: the FLOPs of uniform dropping at
  ``drop_rate``, spent where the gradient suffers least.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..analysis.branches import branches as _branches
from ..analysis.branches import set_dropped_branches
from ..runtime.distributed import mean_over_ranks
from ..runtime.measure import Probe, measuring
from .ldb import check_saved_settings, draw_dropped, restrict_to, trainable_layers

__all__ = ["DropBP", "allocate_rates"]


def allocate_rates(sensitivity: list[float], flops: list[int], target: float, *,
                   step: float = 0.1, max_rate: float = 0.9) -> list[float]:
    """The greedy allocation: rates (multiples of ``step``, at most ``max_rate``) whose expected
    FLOP saving ``sum p_i f_i`` reaches ``target`` (FLOPs), at the least ``sum p_i s_i`` per FLOP.

    Example:
        >>> allocate_rates([1.0, 4.0], [10, 10], target=10, step=0.5, max_rate=1.0)
        [1.0, 0.0]
    """
    rates = [0.0] * len(flops)
    saved = 0.0
    levels = int(round(max_rate / step))
    heap = [(s / f, i) for i, (s, f) in enumerate(zip(sensitivity, flops)) if f > 0]
    heapq.heapify(heap)
    used = [0] * len(flops)
    while heap and saved < target * (1 - 1e-9):
        cost, i = heapq.heappop(heap)
        used[i] += 1
        rates[i] = round(used[i] * step, 10)
        saved += step * flops[i]
        if used[i] < levels:
            heapq.heappush(heap, (cost, i))
    return rates


class DropBP:
    """Drops whole residual branches' backward (DropBP) on a model from :func:`ldbfx.transform`.

    Args:
        gm: the transformed model.
        optimizer: its optimizer (kept for the policies' common shape; DropBP scales nothing).
            Default: ``None``.
        drop_rate: uniform rate, or the mean FLOP-weighted rate the sensitivity allocation
            targets, in ``[0, 1)``. Default: ``0.5``.
        allocation: ``"uniform"`` or ``"sensitivity"`` (rates from :meth:`allocate`, uniform until
            it is called; ``stats["allocation"]`` says which is in effect). Default: ``"uniform"``.
        max_rate: the highest rate the allocation gives a branch, in ``(0, 1]``. Default: ``0.9``.
        step: the allocation's rate increment. Default: ``0.1``.
        seed: seed of the policy's own generator. Default: ``0``.
        branches: restrict the candidates to these eligible branch names. Default: all eligible.

    Raises:
        ValueError: an argument is out of range, a branch is unknown or not eligible, or the
            model has no eligible branch (the message says why and what to do).

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(6)]))
        >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        >>> policy = ldbfx.DropBP(gm, opt, drop_rate=0.5)
        >>> policy.start_epoch(0)
        >>> for step in range(4):
        ...     gm(torch.randn(8, 4)).sum().backward()
        ...     opt.step(); opt.zero_grad()
        ...     policy.step()
        >>> policy.end_epoch()
        >>> policy.stats["steps"]
        4
    """

    def __init__(self, gm, optimizer: torch.optim.Optimizer | None = None, *, drop_rate: float = 0.5,
                 allocation: str = "uniform", max_rate: float = 0.9, step: float = 0.1, seed: int = 0,
                 branches: Iterable[str] | None = None):
        if not (isinstance(drop_rate, (int, float)) and 0.0 <= drop_rate < 1.0):
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if allocation not in ("uniform", "sensitivity"):
            raise ValueError(f"allocation must be 'uniform' or 'sensitivity', got {allocation!r}")
        if not (isinstance(max_rate, (int, float)) and 0.0 < max_rate <= 1.0):
            raise ValueError(f"max_rate must be in (0, 1], got {max_rate!r}")
        if not (isinstance(step, (int, float)) and 0.0 < step <= max_rate):
            raise ValueError(f"step must be in (0, max_rate], got {step!r}")
        records = _branches(gm)
        eligible = restrict_to({b.name: b for b in records if b.eligible}, branches, "branches")
        if not eligible:
            why = ("it has no residual add ldbfx recognises (x + f(x))" if not records else
                   f"none of its {len(records)} branches is eligible "
                   f"({', '.join(sorted({b.reason for b in records if b.reason}))})")
            raise ValueError(f"DropBP needs droppable residual branches, but {why}. See ldbfx.branches(gm); "
                             "keep_first_blocks/keep_last_blocks/branch_filter of ldbfx.transform choose them")
        self.gm, self.optimizer = gm, optimizer
        self.drop_rate, self.max_rate, self.step_size = float(drop_rate), max_rate, step
        self.requested_allocation = allocation
        self.allocation = "uniform"  # in effect: "sensitivity" once allocate() has run
        self.seed = seed
        self._records = records
        self._candidates = tuple(sorted(b.index for b in eligible.values()))
        self._rates = torch.full((len(self._candidates),), self.drop_rate)
        self.sensitivity: dict[str, float] | None = None
        self.flops: dict[str, int] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch: int | None = None
        self._dropped: tuple[int, ...] = ()
        self._counts = {"steps": 0, "branch_draws": 0, "branches_dropped": 0, "steps_nothing_trained": 0}
        # Bitsets over layers: those that train, and those each branch's drop leaves without a
        # gradient. A draw covering every trainable layer trains nothing (counted in stats).
        self._trainable = trainable_layers(gm)
        self._cuts = {i: sum(1 << k for k in gm.ldbfx_state.branch_layers[i]) for i in self._candidates}

    # -- rates --------------------------------------------------------------------------------
    @property
    def rates(self) -> dict[str, float]:
        """Branch name -> its drop rate."""
        return {self._records[i].name: round(float(r), 6) for i, r in zip(self._candidates, self._rates)}

    def allocate(self, closure: Callable[[], torch.Tensor]) -> dict[str, float]:
        """DropBP's sensitivity-based allocation (see the module doc); sets and returns the rates.

        Runs ``closure`` (forward of one batch, returning the loss) once with full backprop and
        once per candidate branch with that branch alone dropped, and differentiates each loss
        with ``torch.autograd.grad``: parameters' ``.grad`` and the optimizer are untouched. The
        policy's current drops are restored afterwards. Under ``torch.distributed`` the
        measurements are averaged over the ranks (one all-reduce: call it on every rank), so
        every rank gets the same rates. :class:`ldbfx.hf.LdbCallback` calls it from a Trainer
        batch (``allocation="sensitivity"``, ``allocate_at``).

        Args:
            closure: computes the loss on a fixed batch (put the model in train mode first).

        Returns:
            Branch name -> allocated rate.
        """
        from torch.utils.flop_counter import FlopCounterMode

        params = [p for p in self.gm.parameters() if p.requires_grad]

        def gradient(probe: Probe, dropped: tuple[int, ...]) -> tuple[list[torch.Tensor | None], int]:
            set_dropped_branches(self.gm, dropped)
            probe.reseed(self.seed)  # the same dropout in every probe
            loss = closure()
            with FlopCounterMode(display=False) as counter:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            return list(grads), counter.get_total_flops()

        # Train-mode probes must not move BatchNorm statistics, nor their drops reach the next
        # optimizer step; the closure sets the mode.
        with measuring(self.gm, train=False) as probe:
            full, full_flops = gradient(probe, ())
            sensitivity, flops = [], []
            for index in self._candidates:
                grads, count = gradient(probe, (index,))
                distance = sum(float(((f if f is not None else 0) - (g if g is not None else 0)).double().pow(2).sum())
                               for f, g in zip(full, grads) if f is not None or g is not None)
                sensitivity.append(distance)
                flops.append(max(full_flops - count, 0))
        # Each rank measured its own batch: the mean gives every rank the same rates and masks.
        averaged = mean_over_ranks([*sensitivity, *flops])
        sensitivity, flops = averaged[:len(sensitivity)], [int(round(f)) for f in averaged[len(sensitivity):]]
        names = [self._records[i].name for i in self._candidates]
        self.sensitivity = dict(zip(names, sensitivity))
        self.flops = dict(zip(names, flops))
        target = self.drop_rate * sum(flops)
        rates = allocate_rates(sensitivity, flops, target, step=self.step_size, max_rate=self.max_rate)
        self._rates = torch.tensor(rates, dtype=torch.float32)
        self.allocation = "sensitivity"
        return self.rates

    # -- schedule -------------------------------------------------------------------------------
    def _apply(self, dropped: tuple[int, ...]) -> None:
        self._dropped = dropped
        set_dropped_branches(self.gm, dropped)

    def _draw(self) -> tuple[int, ...]:
        return draw_dropped(self._generator, self._candidates, self._rates)

    def start_epoch(self, epoch: int) -> None:
        """Draws the first mask of the epoch."""
        self.epoch = epoch
        self._apply(self._draw())

    def step(self) -> None:
        """Call after each ``optimizer.step()``: counts the step and draws the next mask."""
        if self.epoch is None:
            raise RuntimeError("call policy.start_epoch(epoch) before policy.step()")
        self._counts["steps"] += 1
        self._counts["branch_draws"] += len(self._candidates)
        self._counts["branches_dropped"] += len(self._dropped)
        if self._dropped:
            cut = 0
            for i in self._dropped:  # OR, not a sum: nested branches (extra_branches) overlap
                cut |= self._cuts[i]
            if not self._trainable & ~cut:
                self._counts["steps_nothing_trained"] += 1  # the backward reached no trainable parameter
        self._apply(self._draw())

    def end_epoch(self) -> None:
        """Restores full backprop (evaluation and the next epoch start clean)."""
        self._apply(())

    def batch_size(self, base: int) -> int:
        """DropBP keeps the batch size: ``base``."""
        return base

    @property
    def dropped(self) -> tuple[str, ...]:
        """Names of the branches dropped at the current step."""
        return tuple(self._records[i].name for i in self._dropped)

    @property
    def dropped_indices(self) -> tuple[int, ...]:
        """Indices (as in ``ldbfx.branches(gm)``) of the branches dropped at the current step."""
        return self._dropped

    @property
    def stats(self) -> dict[str, float | int | str]:
        """Configured and actual drop rate and steps so far (and the expected FLOP-weighted rate
        once :meth:`allocate` has counted FLOPs). ``steps_nothing_trained`` counts the steps whose
        drops left no trainable parameter a gradient (every eligible branch dropped while the
        kept blocks train nothing): their backward ran and the optimizer updated nothing."""
        draws = self._counts["branch_draws"]
        result: dict[str, Any] = {
            "drop_rate": self.drop_rate, "allocation": self.allocation,
            "actual_drop_rate": self._counts["branches_dropped"] / draws if draws else 0.0,
            **self._counts,
        }
        if self.flops:
            weights = torch.tensor(list(self.flops.values()), dtype=torch.float64)
            result["flop_weighted_rate"] = float((weights * self._rates.double()).sum() / weights.sum())
        return result

    # -- resumable state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "dropped": list(self._dropped),
            "rates": self._rates.tolist(),
            "allocation": self.allocation,
            "sensitivity": self.sensitivity,
            "flops": self.flops,
            "generator": self._generator.get_state(),
            "counts": dict(self._counts),
            "config": {"drop_rate": self.drop_rate, "max_rate": self.max_rate, "step": self.step_size,
                       "seed": self.seed, "candidates": [self._records[i].name for i in self._candidates]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [self._records[i].name for i in self._candidates]
        if state["config"]["candidates"] != names:
            raise ValueError("this DropBP state was saved for other branches "
                             f"({state['config']['candidates']}) than this policy's ({names})")
        check_saved_settings("DropBP", state["config"],
                             {"drop_rate": self.drop_rate, "max_rate": self.max_rate, "step": self.step_size})
        self.epoch = state["epoch"]
        self._rates = torch.tensor(state["rates"], dtype=torch.float32)
        self.allocation, self.sensitivity, self.flops = state["allocation"], state["sensitivity"], state["flops"]
        self._generator.set_state(state["generator"])
        self._counts = {"steps_nothing_trained": 0, **state["counts"]}  # older states lack it
        self._apply(tuple(state["dropped"]))

    def remove(self) -> None:
        """Restores full backprop."""
        self.end_epoch()

