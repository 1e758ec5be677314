"""Measuring passes on a transformed model that leave it as it was.

FLOP counts (:func:`ldbfx.inspect.weight_grad_flops`, :func:`ldbfx.inspect.branch_flops`) and
DropBP's sensitivity probes (:meth:`ldbfx.DropBP.allocate`) run extra forwards and backwards in
train mode, with their own drops. None of that may reach training: BatchNorm statistics, the
random generators, the drops in effect, frozen rows, whether a compile splits at branches, and the
record of skipped layers (which the next ``optimizer.step()`` reads) are all as before afterwards.

Example:
    >>> import torch, ldbfx
    >>> from ldbfx.runtime.measure import measuring
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
    >>> gm = ldbfx.transform(model)
    >>> ldbfx.set_dropped(gm, ["4"])
    >>> with measuring(gm, nothing_dropped=True) as probe:
    ...     ldbfx.dropped(gm)
    ()
    >>> ldbfx.dropped(gm)
    ('4',)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .module import LdbGraphModule

__all__ = ["Probe", "measuring"]


class Probe:
    """What :func:`measuring` yields: :meth:`reseed` gives each pass the same random numbers."""

    def __init__(self, rng: tuple):
        self._rng = rng

    def reseed(self, seed: int | None = None) -> None:
        """Puts the CPU generator and the current CUDA device's back where the measurement began,
        or seeds them with ``seed`` (dropout draws the same mask in every pass either way)."""
        cpu, cuda = self._rng
        if seed is None:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
            return
        # Only the generators restored on exit: torch.manual_seed would also reseed other GPUs,
        # MPS and XPU for good.
        torch.default_generator.manual_seed(seed)
        if cuda is not None:
            torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def measuring(gm: LdbGraphModule, *, train: bool = True, nothing_dropped: bool = False) -> Iterator[Probe]:
    """Runs the block's passes on ``gm`` and restores it afterwards.

    Saved and restored: buffers (BatchNorm statistics), the train/eval mode, the CPU and current
    CUDA device's random generators, the dropped layers and branches, frozen rows, whether a
    compile splits at branches, and the record of skipped layers. Gradients are not touched:
    callers that backpropagate into ``.grad`` clear it themselves.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        train: put ``gm`` in train mode for the passes. Default: ``True``.
        nothing_dropped: start from full backprop (no layer, branch or row dropped). Default:
            ``False``.
    """
    state = gm.ldbfx_state
    # Under a per-block install the blocks' states hold their own records and compile switches.
    states = state.all_states()
    was_training = gm.training
    skipped, cut = [set(s.skipped) for s in states], [s.branch_cut for s in states]
    dropped, branch_drops, rows, rows_exact = state.dropped, state.dropped_branches, state.rows, state.rows_exact
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
    probe = Probe(rng)
    try:
        if train:
            gm.train()
        if nothing_dropped:
            state.set_dropped(())
            state.set_rows({}, rows_exact)
            state.set_dropped_branches(())
        yield probe
    finally:
        probe.reseed()
        state.set_dropped(dropped)
        state.set_rows(rows, rows_exact)
        state.set_dropped_branches(branch_drops)
        for each, each_skipped, each_cut in zip(states, skipped, cut):
            each.branch_cut = each_cut  # measuring does not split a later compile into regions
            each.skipped.clear()
            each.skipped.update(each_skipped)
        gm.train(was_training)
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])
