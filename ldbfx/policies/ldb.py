"""LayerDropBack (LDB) as a policy: which layers skip their weight gradient at each step.

The rules (../shared/METHODS.md §1, LayerDropBack paper):

* **Epoch mode (eq. 1).** Epoch ``e`` is a DROP epoch iff ``e > 0 and e % period == 0``; the others
  backprop fully. Epoch 0 always trains fully.
* **Selection (eq. 2).** In a DROP epoch each eligible layer is dropped independently with
  probability ``drop_rate``. The paper calls ``p`` both the kept set's and the drop probability;
  ldbfx reads it as the probability that a layer's weight gradient is *skipped* (§5.3: speed-up
  grows with it). Redrawn every optimizer step (``resample="step"``, the authors' code) or once
  per epoch (``"epoch"``, Algorithm 1).
* **Update rule (eq. 3).** A dropped layer gets no update at all (``ldbfx.set_dropped`` does that).
* **Batch size and learning rate (eq. 4).** In DROP epochs the batch grows by ``kappa`` and the LR
  by ``lr_scale`` (default ``kappa``, as the experiments use; ``"inverse_keep"`` gives
  ``1 / (1 - drop_rate)``, eq. 4 with ``p`` read as the keep rate).

The LR factor is applied by the optimizer's own step hooks, only while ``optimizer.step()`` runs,
so any ``torch.optim.lr_scheduler`` sees and sets its own values: after a DROP epoch the LR is
exactly what the scheduler alone would give.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from ..analysis.layers import layers as _layers
from ..runtime.mask import set_dropped

__all__ = ["LayerDropBack", "is_drop_epoch", "draw_dropped", "restrict_to"]


def is_drop_epoch(epoch: int, period: int) -> bool:
    """Eq. 1: DROP epochs are the positive multiples of ``period``."""
    return epoch > 0 and epoch % period == 0


def draw_dropped(generator: torch.Generator, candidates: tuple[int, ...],
                 drop_rate: float | torch.Tensor) -> tuple[int, ...]:
    """Eq. 2: each candidate is dropped independently with probability ``drop_rate`` (one rate,
    or a tensor of one rate per candidate)."""
    chosen = (torch.rand(len(candidates), generator=generator) < drop_rate).nonzero().flatten()
    return tuple(candidates[i] for i in chosen.tolist())  # Python work: O(dropped)


def trainable_layers(gm) -> int:
    """The layers with a parameter that needs a gradient now, as a bitset over layer indices."""
    state = gm.ldbfx_state
    return sum(1 << i for i in range(len(state.param_refs)) if any(p.requires_grad for p in state.params(i)))


def restrict_to(eligible: dict[str, Any], names: Iterable[str] | None, what: str) -> dict[str, Any]:
    """``eligible`` (name -> record) restricted to ``names`` (None: all), refusing unknown names."""
    if names is None:
        return eligible
    names = list(names)
    unknown = [n for n in names if n not in eligible]
    if unknown:
        raise ValueError(f"not eligible {what}: {unknown}; eligible are: {', '.join(eligible) or '(none)'}")
    return {n: eligible[n] for n in names}


def check_saved_settings(policy: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raises ``ValueError`` if a policy state was saved with settings other than ``now``'s: it
    would resume silently under the new ones (another drop rate on the old draws, saved rows on
    other layers). ``seed`` may differ (the saved generator replaces it); keys a state from an
    older version lacks are not compared."""
    def plain(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    differ = [f"{key}={now[key]!r} (saved: {saved[key]!r})" for key in now
              if key != "seed" and key in saved and plain(saved[key]) != plain(now[key])]
    if differ:
        raise ValueError(f"this {policy} state was saved with other settings: {', '.join(differ)}; "
                         "build the policy with the saved settings to resume it")


# optimizer -> the LayerDropBack scaling its learning rate (one at a time: two would compound)
_SCALING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerDropBack:
    """The LayerDropBack schedule for a model transformed by :func:`ldbfx.transform`.

    Args:
        gm: the transformed model.
        optimizer: its optimizer; its learning rate is scaled during DROP epochs. ``None`` skips
            LR scaling.
        drop_rate: probability that an eligible layer's weight gradient is skipped at a step of a
            DROP epoch, in ``[0, 1)``. Default: ``0.3``.
        period: every ``period``-th epoch (from epoch ``period`` on) is a DROP epoch. Default: ``2``.
        kappa: batch-size factor in DROP epochs, ``>= 1``. Default: ``2.0``.
        lr_scale: LR factor in DROP epochs: a number, ``None`` (= ``kappa``) or
            ``"inverse_keep"`` (= ``1 / (1 - drop_rate)``). Default: ``None``.
        resample: ``"step"`` (new layers every optimizer step) or ``"epoch"``. Default: ``"step"``.
        seed: seed of the policy's own generator (independent of the global RNG). Default: ``0``.
        layers: restrict the candidates to these eligible layer names. Default: all eligible.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)]))
        >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        >>> policy = ldbfx.LayerDropBack(gm, opt, drop_rate=0.5)
        >>> for epoch in range(3):
        ...     policy.start_epoch(epoch)
        ...     for step in range(4):
        ...         gm(torch.randn(policy.batch_size(8), 4)).sum().backward()
        ...         opt.step(); opt.zero_grad()
        ...         policy.step()
        ...     policy.end_epoch()
        >>> policy.stats["steps_drop"], policy.stats["steps_full"]
        (4, 8)
    """

    def __init__(
        self,
        gm,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        drop_rate: float = 0.3,
        period: int = 2,
        kappa: float = 2.0,
        lr_scale: float | str | None = None,
        resample: str = "step",
        seed: int = 0,
        layers: Iterable[str] | None = None,
    ):
        if not (isinstance(drop_rate, (int, float)) and 0.0 <= drop_rate < 1.0):
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if not (isinstance(period, int) and not isinstance(period, bool) and period >= 1):
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if not (isinstance(kappa, (int, float)) and kappa >= 1.0):
            raise ValueError(f"kappa must be a number >= 1, got {kappa!r}")
        if resample not in ("step", "epoch"):
            raise ValueError(f"resample must be 'step' or 'epoch', got {resample!r}")
        if lr_scale is None:
            lr_factor = float(kappa)
        elif lr_scale == "inverse_keep":
            lr_factor = 1.0 / (1.0 - drop_rate)
        elif isinstance(lr_scale, (int, float)) and not isinstance(lr_scale, bool) and lr_scale > 0:
            lr_factor = float(lr_scale)
        else:
            raise ValueError(f"lr_scale must be None, 'inverse_keep' or a number > 0, got {lr_scale!r}")
        all_layers = _layers(gm)
        eligible = restrict_to({l.name: l.index for l in all_layers if l.eligible}, layers, "layers")
        self.gm, self.optimizer = gm, optimizer
        self.drop_rate, self.period, self.kappa = float(drop_rate), period, float(kappa)
        self.lr_factor, self.resample, self.seed = lr_factor, resample, seed
        self._names = tuple(l.name for l in all_layers)
        self._candidates = tuple(sorted(eligible.values()))
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch: int | None = None
        self.dropping = False
        self._dropped: tuple[int, ...] = ()
        self._counts = {"steps_full": 0, "steps_drop": 0, "layer_draws": 0, "layers_dropped": 0,
                        "steps_nothing_trained": 0}
        self._trainable = trainable_layers(gm)  # a draw of all of them trains nothing (stats)
        self._saved_lrs: list[Any] | None = None
        self._hooks = []
        if optimizer is not None:
            other = _SCALING.get(optimizer)
            if other is not None and other() is not None and other()._hooks:
                raise ValueError(
                    "another LayerDropBack already scales this optimizer's learning rate (its hooks "
                    "are registered): call its remove() first; two would compound the scaling")
            _SCALING[optimizer] = weakref.ref(self)
            self._hooks = [optimizer.register_step_pre_hook(self._scale_lr),
                           optimizer.register_step_post_hook(self._restore_lr)]

    # -- learning rate: scaled only while optimizer.step() runs ----------------------------------
    def _scale_lr(self, optimizer, args, kwargs) -> None:
        if self._saved_lrs is not None:  # the last step raised before the post-hook: undo it
            self._restore_lr(optimizer, args, kwargs)
        if self.dropping and self.lr_factor != 1.0:
            self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_factor

    def _restore_lr(self, optimizer, args, kwargs) -> None:
        if self._saved_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr
            self._saved_lrs = None

    # -- schedule ---------------------------------------------------------------------------------
    def _apply(self, dropped: tuple[int, ...]) -> None:
        self._dropped = dropped
        set_dropped(self.gm, dropped)

    def start_epoch(self, epoch: int) -> None:
        """Decides the epoch's mode (eq. 1) and draws the first mask of a DROP epoch."""
        self.epoch = epoch
        self.dropping = is_drop_epoch(epoch, self.period)
        self._apply(draw_dropped(self._generator, self._candidates, self.drop_rate) if self.dropping else ())

    def step(self) -> None:
        """Call after each ``optimizer.step()``: counts the step and, with ``resample="step"``,
        draws the next step's layers (masks change only between optimizer steps)."""
        if self.epoch is None:
            raise RuntimeError("call policy.start_epoch(epoch) before policy.step()")
        if self.dropping:
            self._counts["steps_drop"] += 1
            self._counts["layer_draws"] += len(self._candidates)
            self._counts["layers_dropped"] += len(self._dropped)
            if self._dropped and not self._trainable & ~sum(1 << i for i in self._dropped):
                self._counts["steps_nothing_trained"] += 1
            if self.resample == "step":
                self._apply(draw_dropped(self._generator, self._candidates, self.drop_rate))
        else:
            self._counts["steps_full"] += 1

    def end_epoch(self) -> None:
        """Restores full backprop (evaluation and the next epoch start clean)."""
        self.dropping = False
        self._apply(())

    def batch_size(self, base: int) -> int:
        """The batch size for the current epoch: ``base * kappa`` in DROP epochs (eq. 4)."""
        return int(round(base * self.kappa)) if self.dropping else base

    @property
    def dropped(self) -> tuple[str, ...]:
        """Names of the layers dropped at the current step."""
        return tuple(self._names[i] for i in self._dropped)

    @property
    def dropped_indices(self) -> tuple[int, ...]:
        """Indices (as in ``ldbfx.layers(gm)``) of the layers dropped at the current step."""
        return self._dropped

    @property
    def stats(self) -> dict[str, float | int]:
        """Configured and actual drop rate, and steps per mode so far. ``steps_nothing_trained``
        counts the DROP steps whose draw held every trainable layer: their backward ran and the
        optimizer updated nothing."""
        draws = self._counts["layer_draws"]
        return {
            "drop_rate": self.drop_rate,
            "actual_drop_rate": self._counts["layers_dropped"] / draws if draws else 0.0,
            **self._counts,
        }

    # -- resumable state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "dropping": self.dropping,
            "dropped": list(self._dropped),
            "generator": self._generator.get_state(),
            "counts": dict(self._counts),
            "config": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        return {"drop_rate": self.drop_rate, "period": self.period, "kappa": self.kappa,
                "lr_factor": self.lr_factor, "resample": self.resample, "seed": self.seed,
                "candidates": [self._names[i] for i in self._candidates]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_saved_settings("LayerDropBack", state["config"], self._settings())
        self.epoch, self.dropping = state["epoch"], state["dropping"]
        self._generator.set_state(state["generator"])
        self._counts = {"steps_nothing_trained": 0, **state["counts"]}  # older states lack it
        self._apply(tuple(state["dropped"]))

    def remove(self) -> None:
        """Removes the LR hooks from the optimizer and restores full backprop."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.end_epoch()
