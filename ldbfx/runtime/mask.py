"""Run-time drop state: which layers skip their weight gradients on the next forward.

:func:`set_dropped` writes the CPU mask every rewritten op reads; nothing is retraced or
recompiled. It also makes ``optimizer.step()`` leave dropped layers untouched (LayerDropBack eq. 3,
``w' = w + Δw · I(l ∈ S)``): torch.optim skips a parameter whose ``.grad`` is ``None``, which is
what an eager backward leaves for a dropped layer. A compiled backward yields zeros instead (an
opaque kernel cannot return "no gradient"), dense mode (DDP) too, and
``zero_grad(set_to_none=False)`` leaves zeros; so ldbfx registers one global optimizer step
pre-hook that sets ``.grad`` to ``None`` right before any optimizer steps, for the layers whose
weight gradient a backward *skipped* since the last step. That record is taken where the mask is
read: by the eager forward, or by the compiled backward's kernels. So changing the mask between
``backward()`` and ``optimizer.step()`` is safe in every path: the step skips what the backward
skipped. (Between forward and backward, eager follows the forward's mask and compiled the
backward's: change masks between steps.) Its cost is one loop over the skipped parameters.

Gradient accumulation: change the mask only between optimizer steps (the policies do). A layer
dropped during any micro-batch of an accumulation window gets no update for the whole window.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .. import ops
from . import state as _state
from ..errors import LayerNotFoundError, LdbfxError
from .module import LdbGraphModule
from ..records import Layer
from .state import LdbState, RowSelection

__all__ = ["set_dropped", "dropped", "discard_skipped", "set_frozen_rows", "frozen_rows", "row_layers", "row_count",
           "refuse_sharded"]

_hook_handle = None


_held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (layout, param ids)


def _optimizer_params(optimizer) -> set[int]:
    """Ids of the parameters ``optimizer`` holds, rebuilt only when its groups change (checked in
    O(groups), so the per-step cost does not grow with the number of parameters)."""
    groups = optimizer.param_groups
    layout = tuple((id(g["params"]), len(g["params"])) for g in groups)
    cached = _held.get(optimizer)
    if cached is None or cached[0] != layout:
        cached = _held[optimizer] = (layout, {id(p) for g in groups for p in g["params"]})
    return cached[1]


def _clear_skipped_grads(optimizer, args, kwargs) -> None:
    # Before any optimizer steps: the layers whose weight gradient a backward skipped since the
    # last step get .grad = None, so the optimizer leaves them and their state alone. Which
    # layers is what the backward did (recorded when the mask was read), not what the mask says
    # now: changing the mask between backward and step changes nothing for this step.
    for state in _state.states_with_native_records():
        state.collect_native_record()
    active = [s for s in _state._ACTIVE if s._skipped]
    if not active:
        return
    held = _optimizer_params(optimizer)
    for state in active:
        state.clear_skipped_grads(held)


def _ensure_skip_hook() -> None:
    """Registers the global optimizer pre-hook that clears skipped layers' gradients (once)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_clear_skipped_grads)


def _check(gm: object) -> LdbGraphModule:
    if not isinstance(gm, LdbGraphModule):
        raise TypeError(
            f"expected a module returned by ldbfx.transform, got {type(gm).__name__}; "
            "call gm = ldbfx.transform(model) first"
        )
    return gm


def _index(gm: LdbGraphModule, layer: str | int | Layer) -> int:
    """Resolves one layer reference in O(1); the list of valid names is built only for errors."""
    layers = gm.ldbfx_layers
    if isinstance(layer, Layer):
        layer = layer.index
    if isinstance(layer, str):
        index = gm.ldbfx_capture.layer_index.get(layer)
    elif isinstance(layer, int) and not isinstance(layer, bool):
        index = layer % len(layers) if -len(layers) <= layer < len(layers) else None
    else:
        raise TypeError(f"layers are named by str or int index, got {type(layer).__name__}: {layer!r}")
    if index is not None and layers[index].eligible:
        return index
    eligible = [l.name for l in layers if l.eligible]
    if index is None:
        raise LayerNotFoundError.unknown(layer, eligible)
    raise LayerNotFoundError(
        f"layer {layers[index].name!r} (index {index}) may not be dropped ({layers[index].reason}). "
        f"Eligible layers are: {', '.join(eligible) or '(none)'}"
    )


def set_dropped(gm: LdbGraphModule, layers: Iterable[str | int | Layer]) -> None:
    """Skips the weight (and bias) gradients of ``layers`` from the next step on.

    No retrace, no recompile: a CPU mask is updated in place. Eager ops read it when the forward
    runs, a compiled model's backward kernels when the backward runs: change it between steps
    (after ``optimizer.step()``, before the next forward), where both agree. ``[]`` restores full backprop.
    Dropped layers still pass the input gradient to earlier layers, and ``optimizer.step()``
    leaves their parameters and optimizer state unchanged.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        layers: names, indices or :class:`ldbfx.Layer` records of eligible layers.

    Raises:
        LayerNotFoundError: a name or index does not exist or is not eligible; the message lists
            the eligible layers.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
        >>> ldbfx.set_dropped(gm, [4, "5"])
        >>> ldbfx.dropped(gm)
        ('4', '5')
        >>> ldbfx.set_dropped(gm, [])
    """
    gm = _check(gm)
    if isinstance(layers, (str, int, Layer)):
        layers = [layers]
    indices = tuple(sorted({_index(gm, layer) for layer in layers}))
    gm.ldbfx_state.set_dropped(indices)
    if indices:
        _ensure_skip_hook()


def dropped(gm: LdbGraphModule) -> tuple[str, ...]:
    """Names of the layers currently dropped, in topological order.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
        >>> ldbfx.dropped(gm)
        ()
        >>> ldbfx.set_dropped(gm, [6, 4])
        >>> ldbfx.dropped(gm)
        ('4', '6')
    """
    gm = _check(gm)
    return tuple(gm.ldbfx_layers[i].name for i in gm.ldbfx_state.dropped)


def discard_skipped(gm: LdbGraphModule) -> None:
    """Forgets which layers the backward skipped since the last ``optimizer.step()``.

    Call it when a step does not happen and its gradients are thrown away: ``GradScaler`` found
    inf/NaN, skipped ``optimizer.step()``, and ``zero_grad()`` follows. The record of what a
    backward skipped is cleared only when an optimizer steps, so without this call the next step
    would also leave those layers untouched, as if they had been dropped in it too. ldbfx's
    trainer and :class:`ldbfx.hf.LdbCallback` call it after a skipped step. Do not call it when
    you skip a step but keep accumulating the same gradients: the record belongs to them.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
        >>> gm, opt = ldbfx.transform(model), torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> ldbfx.set_dropped(gm, ["4"])
        >>> scaler.scale(gm(torch.randn(2, 4)).sum() * float("inf")).backward()
        >>> scaler.step(opt); scaler.update()           # inf: no optimizer.step()
        >>> ldbfx.discard_skipped(gm)                   # layer 4 may train in the next step
        >>> opt.zero_grad()
    """
    _check(gm).ldbfx_state.discard_skipped()


# ------------------------------------------------------------------------------------------------
# Row-level freezing (ChannelDropBack): some output rows / input columns of a layer get no update.
# ------------------------------------------------------------------------------------------------
_ROW_KINDS = ("linear", "conv")
_row_hooks = None
_saved_rows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> saved slices


def _frozen_slices(state: LdbState):
    """``(param, dim, frozen indices)`` for every frozen slice of the model of ``state``."""
    for index, rows in state.rows.items():
        weight, bias = _row_params(state, index)
        yield weight, rows.dim, rows.frozen
        if bias is not None and rows.dim == 0:
            yield bias, 0, rows.frozen


def _save_frozen_rows(optimizer, args, kwargs) -> None:
    # Saving and restoring the frozen slices makes the update rule exact for any optimizer whose
    # state is per element: weight decay, momentum and Adam's moments leave them bit-for-bit
    # unchanged.
    saved = []
    for model_state in [s for s in _state._ACTIVE if s.rows and s.rows_exact]:
        for param, dim, frozen in _frozen_slices(model_state):
            state = optimizer.state.get(param, {})
            _refuse_unsliceable(optimizer, param, state)
            buffers = {k: v.index_select(dim, frozen) for k, v in state.items()
                       if isinstance(v, torch.Tensor) and v.shape == param.shape}
            saved.append((param, dim, frozen, param.detach().index_select(dim, frozen), buffers))
    _saved_rows[optimizer] = saved


def _restore_frozen_rows(optimizer, args, kwargs) -> None:
    with torch.no_grad():
        for param, dim, frozen, values, buffers in _saved_rows.pop(optimizer, ()):
            param.index_copy_(dim, frozen, values)
            state = optimizer.state.get(param, {})
            _refuse_unsliceable(optimizer, param, state)  # state this step created
            for key, value in state.items():
                if not (isinstance(value, torch.Tensor) and value.shape == param.shape):
                    continue
                if key in buffers:
                    value.index_copy_(dim, frozen, buffers[key])
                else:  # created by this step: what it would hold had the rows never trained
                    value.index_fill_(dim, frozen, 0)


def _refuse_unsliceable(optimizer, param, state: dict) -> None:
    """Exact mode keeps the frozen slices of state shaped like the parameter. State of another
    shape with more than one element (Adafactor's row and column statistics, 8-bit Adam's block
    scales) mixes frozen and trained slices: it cannot be kept, and must not change silently."""
    other = [f"{key} {tuple(value.shape)}" for key, value in state.items()
             if isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != param.shape]
    if other:
        raise LdbfxError(
            f"ChannelDropBack's exact mode cannot keep frozen slices of {type(optimizer).__name__}'s "
            f"state {', '.join(other)} for a parameter of shape {tuple(param.shape)}: it is not per "
            "element. Use exact=False (frozen slices get a zero gradient; the optimizer may still "
            "move them) or an optimizer with per-element state")


def _row_layer(gm: LdbGraphModule, layer: str | int | Layer) -> int:
    layers = gm.ldbfx_layers
    index = layer.index if isinstance(layer, Layer) else (
        gm.ldbfx_capture.layer_index.get(layer) if isinstance(layer, str) else layer)
    if not isinstance(index, int) or not -len(layers) <= index < len(layers):
        raise LayerNotFoundError.unknown(layer, [l.name for l in layers if l.kind in _ROW_KINDS])
    record = layers[index]
    if record.kind not in _ROW_KINDS or record.reason == "frozen":
        raise LayerNotFoundError(
            f"layer {record.name!r} (kind {record.kind!r}{', frozen' if record.reason == 'frozen' else ''}) "
            f"cannot freeze rows: only trainable {' and '.join(_ROW_KINDS)} layers can. "
            f"Those are: {', '.join(l.name for l in row_layers(gm))}")
    return index % len(layers)


def row_layers(gm: LdbGraphModule) -> tuple[Layer, ...]:
    """The layers :func:`set_frozen_rows` accepts: the trainable linear and convolution layers.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> gm = ldbfx.transform(model, keep_first=0, keep_last=0)
        >>> [l.name for l in ldbfx.mask.row_layers(gm)]
        ['0', '2']
    """
    return tuple(l for l in gm.ldbfx_layers if l.kind in _ROW_KINDS and l.reason != "frozen")


def row_count(gm: LdbGraphModule, layer: Layer, dim: int = 0) -> int:
    """How many output rows (``dim=0``) or input columns (``dim=1``) ``layer``'s weight has: the
    slices :func:`set_frozen_rows` chooses among.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> gm = ldbfx.transform(model, keep_first=0, keep_last=0)
        >>> [ldbfx.mask.row_count(gm, l, dim=1) for l in ldbfx.mask.row_layers(gm)]
        [4, 3]
    """
    return _row_params(gm.ldbfx_state, layer.index)[0].shape[dim]


def refuse_sharded(param: torch.Tensor, what: str) -> None:
    """Raises for an FSDP2-sharded parameter (a DTensor): row freezing and Learn&Drop read and
    restore parameter slices and gradients as plain tensors. Refused rather than silently wrong."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(param, DTensor):
            raise LdbfxError(f"{what} does not support FSDP2-sharded parameters (fully_shard) yet: "
                             "use DistributedDataParallel with ldbfx.distributed.dense_gradients(gm)")


def _row_params(state: LdbState, index: int):
    params = state.params(index)
    weight = next(p for p in params if p.dim() >= 2)
    bias = next((p for p in params if p.dim() == 1 and p.shape[0] == weight.shape[0]), None)
    return weight, bias


def set_frozen_rows(gm: LdbGraphModule, rows: Mapping[str | int | Layer, object], dim: int = 0,
                    exact: bool = True) -> None:
    """Freezes some output rows (``dim=0``) or input columns (``dim=1``) of linear/conv layers.

    From the next forward on, the weight gradient of each listed layer is computed for its other
    slices only (the backward's ``dW`` FLOPs shrink in proportion; grouped convolutions compute
    it all and zero the frozen slices). ``optimizer.step()`` leaves the frozen slices of the
    weight, of the bias (``dim=0``: the frozen channels' biases) and of the optimizer state
    bit-for-bit unchanged. ``{}`` restores full updates. The input gradient is always complete.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        rows: layer (name, index or :class:`ldbfx.Layer`) -> frozen indices along ``dim`` (a
            sequence or 1-D integer tensor) or a bool tensor over ``dim`` (``True`` = frozen).
        dim: 0 for output channels / rows, 1 for input channels / columns.
        exact: keep the frozen slices of weights and optimizer state bit-for-bit (default). With
            ``False`` only their gradient is zero, so weight decay and momentum still move them.

    Raises:
        LayerNotFoundError: a layer does not exist or is not a trainable linear/conv layer.
        ValueError: ``dim`` is not 0 or 1, or an index is out of range.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)), keep_first=0)
        >>> ldbfx.set_frozen_rows(gm, {"0": [1, 3]})
        >>> ldbfx.frozen_rows(gm)
        {'0': [1, 3]}
        >>> ldbfx.set_frozen_rows(gm, {})
    """
    global _row_hooks
    gm = _check(gm)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (output rows) or 1 (input columns), got {dim!r}")
    table = {}
    for layer, frozen in rows.items():
        index = _row_layer(gm, layer)
        weight, _ = _row_params(gm.ldbfx_state, index)
        refuse_sharded(weight, "set_frozen_rows (ChannelDropBack)")
        size = weight.shape[dim]
        frozen = torch.as_tensor(frozen, device="cpu")  # indices computed on a GPU index a CPU table
        if frozen.dtype == torch.bool:
            if frozen.shape != (size,):
                raise ValueError(f"bool row mask of {gm.ldbfx_layers[index].name!r} must have shape ({size},)")
            frozen = frozen.nonzero().flatten()
        frozen = frozen.to(torch.long).flatten().unique()
        if frozen.numel() and (int(frozen.min()) < 0 or int(frozen.max()) >= size):
            raise ValueError(f"row index out of range for {gm.ldbfx_layers[index].name!r} (size {size} along dim {dim})")
        if not frozen.numel():
            continue
        keep = torch.ones(size, dtype=torch.bool)
        keep[frozen] = False
        table[index] = RowSelection(dim, keep.nonzero().flatten().to(weight.device), frozen.to(weight.device))
    if table:
        ops.rows_in_use()
    gm.ldbfx_state.set_rows(table, exact)
    if table and exact and _row_hooks is None:
        _row_hooks = (register_optimizer_step_pre_hook(_save_frozen_rows),
                      register_optimizer_step_post_hook(_restore_frozen_rows))


def frozen_rows(gm: LdbGraphModule) -> dict[str, list[int]]:
    """Layer name -> frozen indices (along the ``dim`` of the last :func:`set_frozen_rows`).

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
        >>> ldbfx.set_frozen_rows(gm, {"5": [0, 2]})
        >>> ldbfx.frozen_rows(gm)
        {'5': [0, 2]}
    """
    gm = _check(gm)
    return {gm.ldbfx_layers[i].name: rows.frozen.tolist() for i, rows in gm.ldbfx_state.rows.items()}
