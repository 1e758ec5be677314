"""One run-time state object per transformed model: the mask and everything decided from it.

Every transformed model owns exactly one :class:`LdbState` (``gm.ldbfx_state``). It holds the drop
mask the rewritten graph passes to each op, the dense-gradient mode (DDP), ChannelDropBack's row
selections and the record of which layers the backward actually skipped, which is what the
optimizer hook acts on. Other modules go through its methods; nothing is kept in globals keyed by
tensor addresses.

The ops receive the mask tensor (a graph input that ``torch.compile`` reads at run time without
recompiling). They reach the state from it through a stable id stored on the mask object
(``mask._ldbfx_state_id``), looked up in a registry of live states (weak values): eager ops and
the compiled path's custom ops, which receive the same mask object at run time, alike.

Example:
    >>> import torch, ldbfx
    >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
    >>> state = gm.ldbfx_state
    >>> ldbfx.set_dropped(gm, ["5"])
    >>> state.mask.nonzero().flatten().tolist()
    [5]
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LdbState", "RowSelection", "BlockLink", "state_of", "native_records_in_use"]

_IDS = itertools.count(1)
_STATES: weakref.WeakValueDictionary[int, LdbState] = weakref.WeakValueDictionary()
#: States whose optimizer work is pending (skipped layers to clear, frozen rows to restore). The
#: global optimizer hooks visit only these, so models without drops cost nothing.
_ACTIVE: weakref.WeakSet[LdbState] = weakref.WeakSet()

ParamRef = tuple[nn.Module, str]


@dataclass(frozen=True)
class BlockLink:
    """One block's state under a per-block install (:func:`ldbfx.install` with ``blocks=``).

    The model's state (the whole-model analysis's) keeps the global layer and branch indices that
    every public function and policy uses; each block runs its own graph whose state numbers its
    layers from 0. Writing the model's masks writes each block's through these maps.

    Attributes:
        state: the block graph's state.
        layers: global layer index -> the block's local indices (several where a layer is used
            twice in the block: tied parameters).
        branches: global branch index -> the block's local branch index.
    """

    state: LdbState
    layers: dict[int, tuple[int, ...]]
    branches: dict[int, int]


@dataclass(frozen=True)
class RowSelection:
    """Which slices of a layer's weight train this step (ChannelDropBack).

    Attributes:
        dim: 0 = output rows / channels (the bias entries of frozen rows freeze too), 1 = input
            columns / channels (the bias trains).
        kept: indices of the slices that train, on the weight's device.
        frozen: indices of the slices that do not.
    """

    dim: int
    kept: Tensor
    frozen: Tensor


class LdbState:
    """The run-time state of one transformed model.

    Attributes:
        id: stable id, unique among the models of this process (also on ``mask``).
        mask: CPU bool tensor, one entry per layer, ``True`` = dropped. Mutated in place.
        param_refs: per layer, ``(module, attribute)`` of each parameter, resolved on use (FSDP2
            swaps the parameter objects).
        dropped: indices of the layers in the mask now.
        skipped: indices of the layers whose weight gradient a backward skipped since the last
            ``optimizer.step()``: the optimizer hook leaves exactly these untouched.
        rows: layer index -> :class:`RowSelection` (ChannelDropBack).
        rows_exact: whether the optimizer hooks restore frozen slices bit for bit.
        dense: dropped layers report zero gradients (DDP); ``dense_auto``: DDP may turn it on.
        branch_mask: CPU bool tensor, one entry per residual branch (:mod:`ldbfx.analysis.branches`),
            ``True`` = its output is detached. Mutated in place; read by ``ops.branch``.
        branch_layers: per branch, the layers whose gradient comes only through its output (what
            a dropped branch leaves without gradient, and the optimizer then skips).
        dropped_branches: indices of the branches in ``branch_mask`` now.
        branch_cut: whether a compiled forward splits before each gated add (set by the first
            non-empty :meth:`set_dropped_branches`, never cleared: one recompile, ever).
        pinned_eval: modules that ``gm.train()`` leaves in eval mode (Learn&Drop's frozen prefix).
        modes_unchecked: an exported graph checks its modules' train/eval modes at its next eager
            call (set by ``gm.train()`` and :func:`ldbfx.module.recheck_modes`).
    """

    def __init__(self, param_refs: tuple[tuple[ParamRef, ...], ...],
                 branch_layers: tuple[tuple[int, ...], ...] = ()):
        self.id = next(_IDS)
        # On the CPU whatever the default device (a meta-device transform, set_default_device):
        # reading it must never sync a device, and the ops read it through a NumPy view.
        # The mask is the first third of a control buffer that the native kernels
        # (ldbfx/ops/native.cpp) read and write: [mask | skip record | has a row selection].
        n = len(param_refs)
        control = torch.zeros(3 * n, dtype=torch.bool, device="cpu")
        self._control = control
        self.mask = control[:n]
        self.mask._ldbfx_state_id = self.id
        # The ops read one entry per layer and step (:meth:`is_dropped`). Indexing the tensor
        # dispatches two ops (~2 us); an entry of a NumPy view of the same memory reads in ~0.1 us
        # and sees every in-place write. (A model is never pickled, which would copy the view.)
        self._mask_view = self.mask.numpy()
        self._native_record = control[n:2 * n].numpy()
        self._rows_flags = control[2 * n:].numpy()
        self.param_refs = param_refs
        self.dropped: tuple[int, ...] = ()
        self._skipped: set[int] = set()
        # Of a layer still in the record, the parameters an optimizer step has already cleared
        # (ids): a layer leaves the record once all its trainable parameters have been, by one
        # optimizer or several (Muon for matrices and AdamW for biases).
        self._cleared: dict[int, set[int]] = {}
        self.rows: dict[int, RowSelection] = {}
        self.rows_exact = True
        self.dense = False
        self.dense_auto = True
        self.branch_layers = branch_layers
        self.branch_mask = torch.zeros(len(branch_layers), dtype=torch.bool, device="cpu")
        self.dropped_branches: tuple[int, ...] = ()
        self.branch_cut = False
        #: The dropped branch running without autograd now (eager; ``ops.branch_start``), or None.
        self.branch_off: int | None = None
        self.pinned_eval: tuple[nn.Module, ...] = ()
        self.modes_unchecked = True
        #: Per-block install: the blocks' states, which follow this one's masks (one place to
        #: write, one record per block graph that ran). Set by :meth:`link_blocks`.
        self.blocks: tuple[BlockLink, ...] = ()
        # global layer / branch index -> [(position in blocks, local indices or index)]
        self._block_layers: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        self._block_branches: dict[int, list[tuple[int, int]]] = {}
        _STATES[self.id] = self
        if _native_in_use:
            self._register_native()

    def _register_native(self) -> None:
        """Lets the native kernels use this state's control buffer: they know one by its address,
        so they never write into a tensor that merely looks like one. Withdrawn when the state
        dies; the finalizer holds the buffer until then, so no other tensor can take its address
        while it is registered."""
        n = len(self.mask)
        if n:
            address = self._control.data_ptr()
            _native_control(address, n)
            weakref.finalize(self, _withdraw_control, address, self._control).atexit = False

    def __reduce__(self):
        # An unpickled copy would hold copies of the NumPy views and no registered control
        # buffer, and share the original's id: it would silently miss the kernels' records.
        raise TypeError("an ldbfx model state cannot be pickled; save the model's state_dict() instead")

    # -- layers ---------------------------------------------------------------------------------
    def params(self, index: int) -> tuple[nn.Parameter, ...]:
        """The parameters of layer ``index`` as the model holds them now."""
        return tuple(module._parameters[name] for module, name in self.param_refs[index])

    def set_dropped(self, indices: tuple[int, ...]) -> None:
        """Writes the mask. What the optimizer skips is decided by :meth:`record_skipped`."""
        self.mask.zero_()
        if indices:
            self.mask[list(indices)] = True
        self.dropped = indices
        if self.blocks:  # O(dropped) to sort out, then one write per block
            per_block: list[list[int]] = [[] for _ in self.blocks]
            for index in indices:
                for position, local in self._block_layers.get(index, ()):
                    per_block[position].extend(local)
            for link, local in zip(self.blocks, per_block):
                link.state.set_dropped(tuple(sorted(local)))

    def link_blocks(self, links: tuple[BlockLink, ...]) -> None:
        """Makes the blocks' states follow this one's masks (``()``: none any more)."""
        self.blocks = links
        self._block_layers, self._block_branches = {}, {}
        for position, link in enumerate(links):
            for index, local in link.layers.items():
                self._block_layers.setdefault(index, []).append((position, local))
            for index, local in link.branches.items():
                self._block_branches.setdefault(index, []).append((position, local))

    def is_dropped(self, mask: Tensor, index: int) -> bool:
        """``bool(mask[index])``, for the ops: read through the view where ``mask`` is this
        state's (always, unless an op was handed another tensor)."""
        if mask is self.mask:
            return bool(self._mask_view[index])
        return bool(mask[index])

    # -- what the backward skipped ----------------------------------------------------------------
    def record_forward(self) -> None:
        """Eager forward with grad enabled: the mask was read now, so its drops are skipped."""
        if self.dropped:
            self._skipped.update(self.dropped)
            self._forget_cleared(self.dropped)
            _ACTIVE.add(self)

    def _forget_cleared(self, indices) -> None:
        """A new backward skipped ``indices``: each of their parameters must be cleared again."""
        if self._cleared:
            for index in indices:
                self._cleared.pop(index, None)

    @property
    def skipped(self) -> set[int]:
        """The layers skipped since the last step (the native kernels' record merged in)."""
        if _native_in_use:
            self.collect_native_record()
        return self._skipped

    @skipped.setter
    def skipped(self, value: set[int]) -> None:
        self._skipped = value

    def collect_native_record(self) -> None:
        """Moves what the native kernels recorded (bytes of the control buffer) into the record."""
        record = self._native_record
        if record.any():
            # Clears only the bytes read: a kernel of another thread's backward may write one
            # between the read and the clear, and that skip must stay for the next merge.
            indices = record.nonzero()[0]
            record[indices] = False
            skipped = indices.tolist()
            self._skipped.update(skipped)
            self._forget_cleared(skipped)
            _ACTIVE.add(self)

    def record_skipped(self, index: int) -> None:
        """The compiled path's backward skipped layer ``index`` (it reads the mask then)."""
        self._skipped.add(index)
        if self._cleared:
            self._cleared.pop(index, None)
        _ACTIVE.add(self)

    def discard_skipped(self) -> None:
        """Forgets the record, the native kernels' bytes included: the gradients it described
        were thrown away without an optimizer step (see :func:`ldbfx.discard_skipped`)."""
        self.collect_native_record()
        self._skipped.clear()
        self._cleared.clear()
        for link in self.blocks:
            link.state.discard_skipped()

    def all_states(self) -> tuple[LdbState, ...]:
        """This state and, under a per-block install, every block's."""
        return (self, *(link.state for link in self.blocks))

    def absorb_block_records(self) -> None:
        """Takes the blocks' records of skipped layers as this state's own (before the blocks'
        states go: an optimizer step after must still leave those layers alone)."""
        new = self.skipped_globally() - self._skipped
        if new:
            self._skipped.update(new)
            self._forget_cleared(new)
            _ACTIVE.add(self)

    def skipped_globally(self) -> set[int]:
        """The layers skipped since the last step, in this state's (global) indices: its own
        record and, under a per-block install, the blocks' records mapped back."""
        skipped = set(self.skipped)
        for link in self.blocks:
            local = link.state.skipped
            if local:
                skipped.update(g for g, locals_ in link.layers.items() if not local.isdisjoint(locals_))
        return skipped

    def clear_skipped_grads(self, held: set[int]) -> None:
        """Before ``optimizer.step()``: the parameters of skipped layers that the optimizer holds
        (ids in ``held``) get ``.grad = None``, so nothing moves them (no momentum, no weight
        decay). A layer leaves the record when each of its trainable parameters has been cleared
        so, by this optimizer or another one (a GAN's two; Muon and AdamW sharing a layer)."""
        done = []
        for index in self._skipped:  # the hook has merged the native record already
            cleared = self._cleared.get(index, ())
            pending = False
            for p in self.params(index):
                if id(p) in cleared or not p.requires_grad:
                    continue
                if id(p) in held:
                    p.grad = None
                    self._cleared.setdefault(index, set()).add(id(p))
                else:
                    pending = True  # another optimizer's, or none's: it waits for that step
            if not pending:
                done.append(index)
        self._skipped.difference_update(done)
        for index in done:
            self._cleared.pop(index, None)

    # -- branches ---------------------------------------------------------------------------------
    def set_dropped_branches(self, indices: tuple[int, ...]) -> None:
        """Writes the branch mask; a non-empty one also turns ``branch_cut`` on for good."""
        self.branch_mask.zero_()
        if indices:
            self.branch_mask[list(indices)] = True
            self.branch_cut = True
        self.dropped_branches = indices
        if self.blocks:
            per_block: list[list[int]] = [[] for _ in self.blocks]
            for index in indices:
                for position, local in self._block_branches.get(index, ()):
                    per_block[position].append(local)
            for link, local in zip(self.blocks, per_block):
                link.state.set_dropped_branches(tuple(sorted(local)))
                # Every block splits its compiled graph from the first drop on, wherever it fell:
                # blocks sharing one compiled graph then keep sharing it (one recompile, ever).
                link.state.branch_cut = self.branch_cut

    def record_branch(self, index: int) -> None:
        """A forward detached branch ``index``: its inner layers' updates are skipped."""
        layers = self.branch_layers[index]
        if layers:
            self._skipped.update(layers)
            self._forget_cleared(layers)
            _ACTIVE.add(self)

    def branch_params(self, index: int) -> tuple[nn.Parameter, ...]:
        """The trainable parameters of branch ``index``'s inner layers (dense mode's zeros)."""
        return tuple(p for i in self.branch_layers[index] for p in self.params(i) if p.requires_grad)

    # -- row selections ---------------------------------------------------------------------------
    def set_rows(self, rows: dict[int, RowSelection], exact: bool) -> None:
        if rows and self.blocks:
            from ..errors import LdbfxError

            raise LdbfxError(
                "frozen rows (ChannelDropBack) are not served by a per-block install yet: install "
                "the whole graph (ldbfx.install(model, gm) without blocks=), or drop whole layers")
        self.rows, self.rows_exact = rows, exact
        self._rows_flags[:] = False  # the native kernels leave these layers to the Python ones
        if rows:
            self._rows_flags[list(rows)] = True
        if rows and exact:
            _ACTIVE.add(self)

    def row_selection(self, index: int) -> RowSelection | None:
        return self.rows.get(index) if self.rows else None

    # -- dense gradients --------------------------------------------------------------------------
    def set_dense(self, enabled: bool) -> None:
        """Sets dense mode for good: DDP's forward no longer decides (``dense_auto`` off)."""
        self.dense, self.dense_auto = enabled, False
        for link in self.blocks:
            link.state.set_dense(enabled)

    def __deepcopy__(self, memo):
        """A copy (``copy.deepcopy(gm)``: EMA, model soups) has its own mask, id and record, and
        the same drops, rows and modes, on its own modules (``memo`` maps them)."""
        import copy

        result = LdbState(copy.deepcopy(self.param_refs, memo), self.branch_layers)
        memo[id(self)] = result
        result.set_dropped(self.dropped)
        result.set_dropped_branches(self.dropped_branches)
        result.branch_cut = self.branch_cut
        result.skipped = set(self.skipped)
        result.set_rows(copy.deepcopy(self.rows, memo), self.rows_exact)
        result.dense, result.dense_auto = self.dense, self.dense_auto
        result.pinned_eval = copy.deepcopy(self.pinned_eval, memo)
        result.modes_unchecked = True
        if result.skipped:
            _ACTIVE.add(result)
        return result


_native_in_use = False
_native_control: Callable[[int, int], None] | None = None  # native.cpp's ldbfx_native_control


def native_records_in_use(control: Callable[[int, int], None]) -> None:
    """Called when the native kernels load, with their registry function ``control(address, n)``
    (``n == 0`` withdraws): from then on, every state's control buffer is registered with them
    and their records are merged."""
    global _native_in_use, _native_control
    _native_control, _native_in_use = control, True
    for state in list(_STATES.values()):
        state._register_native()


def _withdraw_control(address: int, buffer: Tensor) -> None:
    """A state's finalizer: ``buffer`` (held until now) leaves the native kernels' registry."""
    _native_control(address, 0)


def states_with_native_records() -> list[LdbState]:
    """Live states, once native kernels are in use (their records must be merged before a step)."""
    return list(_STATES.values()) if _native_in_use else []


def state_of(mask: Tensor) -> LdbState:
    """The state owning ``mask`` (what the ops receive)."""
    state = _STATES.get(getattr(mask, "_ldbfx_state_id", None))
    if state is None:
        from ..errors import LdbfxError

        raise LdbfxError("this drop mask belongs to no live ldbfx model (was the mask tensor replaced "
                         "or copied?): use ldbfx.set_dropped(gm, ...) to change drops")
    return state
