"""ChannelDropBack (CDB) as a policy: each step, some channels of some layers get no update.

The rules (../shared/METHODS.md §2, ChannelDropBack paper), with the authors' code as options:

* **Layer selection.** ``selection="one"`` (the paper, default): at each step, with probability
  ``layer_rate``, one candidate layer is chosen uniformly. ``"independent"`` (the authors' code):
  every candidate is selected independently with probability ``layer_rate``.
* **Channel selection.** In a selected layer each output channel / row (``dim=0``, default) or
  input channel / column (``dim=1``, the authors' code) is frozen with probability
  ``channel_rate(epoch)``; the others train.
* **Candidates.** Trainable linear and convolution layers in topological order, except the first
  ``skip_first`` of them (the paper: "the first four layers are never selected"). This is CDB's
  own rule; ``transform``'s ``keep_first``/``keep_last`` (LayerDropBack's) do not apply.
* **Update rule.** Frozen slices get no update at all: zero gradient, and weight, bias (``dim=0``)
  and optimizer state bit-for-bit unchanged (:func:`ldbfx.set_frozen_rows`). ``exact=False``
  keeps only the zero gradient, so weight decay and momentum still move them (the authors' code).
  ``rescale=True`` multiplies the kept slices' gradient by ``1 / kept fraction`` (the authors' code).
* **Real savings.** The weight gradient is computed for the kept slices only, so backward FLOPs
  fall in proportion to the frozen slices (the published code computes everything, then zeroes).
* **Schedules** of the channel rate (:func:`channel_rate_at`): ``"fixed"`` from the first step;
  ``"milestones"``: zero until the first milestone, then ``channel_rate * k / len(milestones)``
  after the k-th (paper §3.3: raised after each LR decay); ``"ramp"``: linear from 0 at epoch 0 to
  ``channel_rate`` at the last milestone (paper §4.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..runtime.mask import row_count, row_layers, set_frozen_rows
from .ldb import check_saved_settings

__all__ = ["ChannelDropBack", "channel_rate_at"]

_SCHEDULES = ("fixed", "milestones", "ramp")


def channel_rate_at(epoch: int, schedule: str, channel_rate: float, milestones: Sequence[int] = ()) -> float:
    """The channel drop rate in ``epoch`` under ``schedule`` (see the module docstring).

    Example:
        >>> [channel_rate_at(e, "milestones", 0.3, [2, 4]) for e in range(6)]
        [0.0, 0.0, 0.15, 0.15, 0.3, 0.3]
        >>> [round(channel_rate_at(e, "ramp", 0.3, [3]), 2) for e in range(5)]
        [0.0, 0.1, 0.2, 0.3, 0.3]
    """
    if schedule == "fixed":
        return channel_rate
    if schedule == "milestones":
        return channel_rate * sum(epoch >= m for m in milestones) / len(milestones)
    if schedule == "ramp":
        return channel_rate * min(1.0, epoch / milestones[-1])
    raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")


class ChannelDropBack:
    """The ChannelDropBack policy for a model transformed by :func:`ldbfx.transform`.

    Args:
        gm: the transformed model.
        optimizer: its optimizer (needed for ``rescale=True``; may be ``None`` otherwise).
        layer_rate: with ``selection="one"`` the probability that a step selects a layer; with
            ``"independent"`` each candidate's selection probability. In ``(0, 1]``. Default: ``1.0``.
        channel_rate: (final) probability that a slice of a selected layer is frozen, in
            ``[0, 1]``. Default: ``0.5`` (the paper's best).
        schedule: ``"fixed"``, ``"milestones"`` or ``"ramp"``. Default: ``"fixed"``.
        milestones: epochs of the ``"milestones"``/``"ramp"`` schedules (increasing).
        dim: 0 = output channels / rows, 1 = input channels / columns. Default: ``0``.
        skip_first: the first candidates never selected. Default: ``4``.
        selection: ``"one"`` or ``"independent"``. Default: ``"one"``.
        exact: frozen slices keep their weights and optimizer state bit-for-bit. Default: ``True``.
        rescale: scale kept slices' gradient by ``1 / kept fraction``. Default: ``False``.
        seed: seed of the policy's own generator. Default: ``0``.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]))
        >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
        >>> policy = ldbfx.ChannelDropBack(gm, opt, channel_rate=0.5)
        >>> policy.start_epoch(0)
        >>> for step in range(3):
        ...     gm(torch.randn(4, 8)).sum().backward()
        ...     opt.step(); opt.zero_grad()
        ...     policy.step()
        >>> policy.end_epoch()
        >>> policy.candidates
        ('4', '5')
    """

    def __init__(
        self,
        gm,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        layer_rate: float = 1.0,
        channel_rate: float = 0.5,
        schedule: str = "fixed",
        milestones: Sequence[int] = (),
        dim: int = 0,
        skip_first: int = 4,
        selection: str = "one",
        exact: bool = True,
        rescale: bool = False,
        seed: int = 0,
    ):
        if not (isinstance(layer_rate, (int, float)) and 0.0 < layer_rate <= 1.0):
            raise ValueError(f"layer_rate must be in (0, 1], got {layer_rate!r}")
        if not (isinstance(channel_rate, (int, float)) and 0.0 <= channel_rate <= 1.0):
            raise ValueError(f"channel_rate must be in [0, 1], got {channel_rate!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        milestones = [int(m) for m in milestones]
        if schedule != "fixed" and (not milestones or milestones != sorted(set(milestones)) or milestones[0] < 1):
            raise ValueError(f"schedule {schedule!r} needs increasing positive milestones (epochs), got {milestones!r}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output channels) or 1 (input channels), got {dim!r}")
        if selection not in ("one", "independent"):
            raise ValueError(f"selection must be 'one' or 'independent', got {selection!r}")
        if not (isinstance(skip_first, int) and skip_first >= 0):
            raise ValueError(f"skip_first must be an integer >= 0, got {skip_first!r}")
        if rescale and optimizer is None:
            raise ValueError("rescale=True scales gradients before optimizer.step(): pass the optimizer")
        records = row_layers(gm)
        if len(records) <= skip_first:
            raise ValueError(f"no candidate layer: the model has {len(records)} trainable linear/conv "
                             f"layers and skip_first={skip_first}")
        self.gm, self.optimizer = gm, optimizer
        self.layer_rate, self.channel_rate = float(layer_rate), float(channel_rate)
        self.schedule, self.milestones, self.dim = schedule, milestones, dim
        self.skip_first, self.selection, self.exact, self.rescale = skip_first, selection, exact, rescale
        self.seed = seed
        self._records = tuple(records[skip_first:])
        self._sizes = tuple(row_count(gm, l, dim) for l in self._records)
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch: int | None = None
        self.rate = 0.0
        self._frozen: dict[int, torch.Tensor] = {}  # position in candidates -> frozen indices
        self._counts = {"steps": 0, "layers_selected": 0, "rows_selected": 0, "rows_frozen": 0}
        self._hooks = [optimizer.register_step_pre_hook(self._rescale)] if rescale else []

    # -- drawing ----------------------------------------------------------------------------------
    def _draw(self) -> dict[int, torch.Tensor]:
        g, n = self._generator, len(self._records)
        if self.rate == 0.0:
            return {}
        if self.selection == "one":
            chosen = [int(torch.randint(n, (1,), generator=g))] if float(torch.rand(1, generator=g)) < self.layer_rate else []
        else:
            chosen = (torch.rand(n, generator=g) < self.layer_rate).nonzero().flatten().tolist()
        frozen = {}
        for position in chosen:
            rows = (torch.rand(self._sizes[position], generator=g) < self.rate).nonzero().flatten()
            frozen[position] = rows
        return frozen

    def _apply(self, frozen: dict[int, torch.Tensor]) -> None:
        self._frozen = frozen
        set_frozen_rows(self.gm, {self._records[p].index: rows for p, rows in frozen.items()}, dim=self.dim,
                        exact=self.exact)

    def _rescale(self, optimizer, args, kwargs) -> None:
        for position, rows in self._frozen.items():
            size = self._sizes[position]
            if 0 < rows.numel() < size:
                for param in self.gm.ldbfx_state.params(self._records[position].index):
                    if param.grad is not None and (param.dim() >= 2 or self.dim == 0):
                        param.grad.mul_(size / (size - rows.numel()))

    # -- schedule ---------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Sets the epoch's channel rate (the schedule) and draws the first step's slices."""
        self.epoch = epoch
        self.rate = channel_rate_at(epoch, self.schedule, self.channel_rate, self.milestones)
        self._apply(self._draw())

    def step(self) -> None:
        """Call after each ``optimizer.step()``: counts the step and draws the next one's slices."""
        if self.epoch is None:
            raise RuntimeError("call policy.start_epoch(epoch) before policy.step()")
        self._counts["steps"] += 1
        self._counts["layers_selected"] += len(self._frozen)
        self._counts["rows_selected"] += sum(self._sizes[p] for p in self._frozen)
        self._counts["rows_frozen"] += sum(r.numel() for r in self._frozen.values())
        self._apply(self._draw())

    def end_epoch(self) -> None:
        """Restores full updates (evaluation and the next epoch start clean)."""
        self._apply({})

    def batch_size(self, base: int) -> int:
        """CDB keeps the batch size (the trainer's common interface)."""
        return base

    @property
    def candidates(self) -> tuple[str, ...]:
        """Names of the layers that may be selected."""
        return tuple(l.name for l in self._records)

    @property
    def frozen(self) -> dict[str, list[int]]:
        """Layer name -> frozen slices at the current step."""
        return {self._records[p].name: rows.tolist() for p, rows in self._frozen.items()}

    @property
    def stats(self) -> dict[str, float | int]:
        """Configured rates and what was actually frozen so far."""
        c = self._counts
        return {"layer_rate": self.layer_rate, "channel_rate": self.rate,
                "actual_channel_rate": c["rows_frozen"] / c["rows_selected"] if c["rows_selected"] else 0.0,
                "layers_per_step": c["layers_selected"] / c["steps"] if c["steps"] else 0.0, **c}

    # -- resumable state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rate": self.rate, "generator": self._generator.get_state(),
                "counts": dict(self._counts), "frozen": {p: r.tolist() for p, r in self._frozen.items()},
                "config": self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {"layer_rate": self.layer_rate, "channel_rate": self.channel_rate,
                "schedule": self.schedule, "milestones": self.milestones, "dim": self.dim,
                "skip_first": self.skip_first, "selection": self.selection, "seed": self.seed,
                "exact": self.exact, "rescale": self.rescale, "candidates": [l.name for l in self._records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_saved_settings("ChannelDropBack", state["config"], self._settings())
        self.epoch, self.rate = state["epoch"], state["rate"]
        self._generator.set_state(state["generator"])
        self._counts = dict(state["counts"])
        self._apply({int(p): torch.tensor(r, dtype=torch.long) for p, r in state["frozen"].items()})

    def remove(self) -> None:
        """Removes the optimizer hook and restores full updates."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.end_epoch()
