"""The functions a rewritten graph calls: forward unchanged, weight gradient skippable.

The drop decision lives in a CPU bool tensor ``mask`` (one entry per layer, ``True`` = dropped) that
:func:`ldbfx.set_dropped` mutates in place. Two paths read it:

* **Eager**: each function reads ``mask[index]`` (a CPU read, no device sync) and runs the plain
  op, with the layer's parameters *detached* when it is dropped. Autograd then computes exactly
  what it computes for a frozen parameter (``requires_grad=False``): no weight gradient, no saved
  activation that only the weight gradient needs, and an output that needs no gradient when
  nothing else feeding the layer does. It is the ideal of toggling ``requires_grad``, per call,
  without touching the parameter. Kept layers run the untouched op, so all gradients are bitwise
  those of the original model with the dropped layers' parameters frozen (same kernels, same
  arguments). In dense mode (DDP) the dropped layers' parameters also get zero gradients.
* **Compiled** (``torch.compiler.is_compiling()``): the tracer must not specialise on the mask
  (it would recompile whenever the mask changes), so the op runs inside an autograd Function
  whose backward computes the input gradient with ordinary ops and the weight gradient in an
  opaque ``torch.library.custom_op`` that reads the mask when the compiled backward *runs*. An
  identity function on the parameter would not do: the consuming op would still compute ``dW``
  (measured: ResNet-50 31.9 GFLOP either way), so the Function owns the layer's whole backward.
  A dropped layer yields a zero gradient there, which the optimizer hook of :mod:`ldbfx.mask`
  turns back into ``None`` before ``optimizer.step()``.

Every function falls back to the plain op when no gradient is needed (``no_grad``, frozen
inputs), so inference costs nothing extra and the mask changes nothing there.
"""

from __future__ import annotations

import importlib
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "opaque_path", "linear", "conv", "matmul", "embedding", "masked_param", "batch_norm", "module_call",
    "multi_head_attention", "routed_call", "RowSelection", "register_rows", "row_selection",
]

_aten = torch.ops.aten
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


_opaque_in_eager = False  # tests and benchmarks run the compiled path's Functions eagerly


# Mask storages of models whose dropped layers must yield zero gradients rather than none, so
# that every parameter gets a gradient each step (DistributedDataParallel's reducer expects it):
# their dropped layers take the opaque path in eager mode too. See ldbfx.distributed.dense_gradients.
_DENSE: set[int] = set()


def _opaque(mask: Tensor, index: int) -> bool:
    """Whether to run the compiled path's Functions (under compile, or in ``opaque_path``)."""
    return _opaque_in_eager or torch.compiler.is_compiling()


def _dense(mask: Tensor) -> bool:
    """Whether the model owning ``mask`` is in dense-gradient mode (eager only)."""
    return bool(_DENSE) and mask.untyped_storage().data_ptr() in _DENSE


class _WithZeroGrads(torch.autograd.Function):
    """Dense mode: ``out`` passes through unchanged and each of ``params`` gets a zero gradient.

    A dropped layer of a model under DDP runs exactly the default eager path (detached
    parameters: no dW computed, no activation kept for it), then this node gives its parameters
    the zero gradients DDP's reducer waits for. ``out`` is marked dirty (as an in-place op would
    be) rather than viewed, so later in-place ops on it (``ReLU(inplace=True)``) work, and the
    gradient reaching ``out``'s own producer is the very tensor that arrived here: the input
    gradients, hence every kept layer's gradients, are bitwise those of the default path.
    """

    @staticmethod
    def forward(ctx, out, *params):
        ctx.mark_dirty(out)
        ctx.geometry = [(p.shape, p.stride(), p.dtype, p.device) for p in params]  # no reference kept
        return out

    @staticmethod
    def backward(ctx, grad):
        zeros = tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                      for shape, stride, dtype, device in ctx.geometry)
        return (grad, *zeros)


def _dropped_output(out: Tensor, mask: Tensor, *params: Tensor | None) -> Tensor:
    """The output of a dropped layer's eager op (run on detached ``params``): in dense mode, with
    zero gradients for ``params`` attached."""
    if not _dense(mask):
        return out
    params = tuple(p for p in params if p is not None and p.requires_grad)
    return _WithZeroGrads.apply(out, *params) if params else out


class opaque_path:
    """Context manager: use the compiled path's autograd Functions in eager mode too.

    For tests and benchmarks of the Functions and custom ops without compiling a model.
    """

    def __enter__(self):
        global _opaque_in_eager
        self._previous, _opaque_in_eager = _opaque_in_eager, True

    def __exit__(self, *exc):
        global _opaque_in_eager
        _opaque_in_eager = self._previous


def _is_dropped(mask: Tensor, index: int) -> bool:
    # Eager only: a CPU tensor read, about a microsecond.
    return bool(mask[index])


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts like autocast would inside ``F.linear``/``F.conv*``, but outside our Function.

    Autocast casts fp32 inputs of matmuls and convolutions to its low-precision dtype. Doing the
    cast here records it as an ordinary autograd op, so our backward receives the low-precision
    tensors exactly as aten's backward would, and the cast's own backward returns ``dW`` in the
    parameter's dtype.
    """
    ref = next(t for t in tensors if t is not None)
    device = ref.device.type
    if device not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


# --------------------------------------------------------------------------------------------
# Row selections (ChannelDropBack): a kept layer may compute its weight gradient for some output
# rows (dim 0) or input columns (dim 1) only. :func:`ldbfx.mask.set_frozen_rows` registers the
# selections of one model under its mask's storage, which every op of that model receives: no
# graph change, nothing to retrace, and a model without selections pays one empty-dict test.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSelection:
    """Which slices of a layer's weight train this step.

    Attributes:
        dim: 0 = output rows / channels (the bias entries of frozen rows freeze too), 1 = input
            columns / channels (the bias trains).
        kept: indices of the slices that train, on the weight's device.
        frozen: indices of the slices that do not.
    """

    dim: int
    kept: Tensor
    frozen: Tensor


_ROW_TABLES: dict[int, tuple[weakref.ref, dict[int, RowSelection]]] = {}


def register_rows(mask: Tensor, table: dict[int, RowSelection]) -> None:
    """Makes ``table`` (layer index -> selection) the row selections of the model owning ``mask``."""
    key = mask.untyped_storage().data_ptr()
    if table:
        _ROW_TABLES[key] = (weakref.ref(mask), table)
    else:
        _ROW_TABLES.pop(key, None)


def row_selection(mask: Tensor, index: int) -> RowSelection | None:
    """The selection of layer ``index`` of the model owning ``mask``, or None (all rows train)."""
    if not _ROW_TABLES:
        return None
    entry = _ROW_TABLES.get(mask.untyped_storage().data_ptr())
    if entry is None:
        return None
    if entry[0]() is None:  # the model died and its storage address was reused: forget it
        del _ROW_TABLES[mask.untyped_storage().data_ptr()]
        return None
    return entry[1].get(index)


def _linear_weight_grad_rows(grad2d: Tensor, x2d: Tensor, rows: RowSelection, with_bias: bool):
    """``dW`` (and ``db``) of ``y = x @ W.T + b`` for the kept slices only: FLOPs in proportion."""
    grad_w = grad2d.new_zeros(grad2d.shape[1], x2d.shape[1])
    if rows.dim == 0:
        g = grad2d.index_select(1, rows.kept)
        grad_w.index_copy_(0, rows.kept, g.t().mm(x2d))
        grad_b = grad2d.new_zeros(grad2d.shape[1]).index_copy_(0, rows.kept, g.sum(0)) if with_bias else None
    else:
        grad_w.index_copy_(1, rows.kept, grad2d.t().mm(x2d.index_select(1, rows.kept)))
        grad_b = grad2d.sum(0) if with_bias else None
    return grad_w, grad_b


def _conv_bias_grad(grad: Tensor) -> Tensor:
    return grad.sum([d for d in range(grad.dim()) if d != 1])


def _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups, rows: RowSelection,
                           with_bias: bool):
    """``dW`` (and ``db``) of a convolution for the kept output (dim 0) or input (dim 1) channels.

    Grouped convolutions mix channels across groups, so slicing would change the op: they compute
    the whole ``dW`` and zero the frozen slices (right values, no saving).
    """
    if groups != 1:
        _, grad_w, grad_b = _aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if with_bias else None, stride, padding, dilation,
            False, [0] * len(stride), groups, [False, True, with_bias])
        grad_w.index_fill_(rows.dim, rows.frozen, 0)
        if with_bias and rows.dim == 0:
            grad_b.index_fill_(0, rows.frozen, 0)
        return grad_w, grad_b
    if not rows.kept.numel():  # every slice frozen (aten rejects a convolution with 0 channels)
        grad_b = _conv_bias_grad(grad) if rows.dim == 1 else grad.new_zeros(weight.shape[0])
        return torch.zeros_like(weight), grad_b if with_bias else None
    if rows.dim == 0:
        grad, w = grad.index_select(1, rows.kept), weight.index_select(0, rows.kept)
    else:
        x, w = x.index_select(1, rows.kept), weight.index_select(1, rows.kept)
    _, part_w, part_b = _aten.convolution_backward(
        grad, x, w, [w.shape[0]] if with_bias else None, stride, padding, dilation,
        False, [0] * len(stride), 1, [False, True, with_bias and rows.dim == 0])
    grad_w = torch.zeros_like(weight).index_copy_(rows.dim, rows.kept, part_w)
    grad_b = None
    if with_bias:
        if rows.dim == 0:
            grad_b = grad.new_zeros(weight.shape[0]).index_copy_(0, rows.kept, part_b)
        else:
            grad_b = _conv_bias_grad(grad)
    return grad_w, grad_b


class _LinearRows(torch.autograd.Function):
    """Eager path of a linear layer with a row selection: full ``dX``, ``dW`` for kept slices."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows):
        ctx.rows, ctx.x_shape, ctx.with_bias = rows, x.shape, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad2d.mm(weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = _linear_weight_grad_rows(grad2d, x.reshape(-1, x.shape[-1]), ctx.rows, ctx.with_bias)
        return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, None


class _ConvRows(torch.autograd.Function):
    """Eager path of a convolution with a row selection: full ``dX``, ``dW`` for kept slices."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, rows):
        ctx.conv, ctx.rows, ctx.with_bias = (stride, padding, dilation, groups), rows, bias is not None
        ctx.save_for_backward(x, weight)
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                [0] * len(stride), groups, [True, False, False])[0]
        grad_w, grad_b = _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups,
                                                ctx.rows, ctx.with_bias)
        return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Opaque weight-gradient kernels for the compiled path. They read the mask at run time.
# ``flexible_layout`` and returning exactly the strides of the fake keep Inductor from inserting
# layout copies around them (the prototype in the core issue measured +27% on a channels_last
# CNN backward without them).
# --------------------------------------------------------------------------------------------
_TAGS = (torch.Tag.flexible_layout,)


@torch.library.custom_op("ldbfx::linear_weight_grad", mutates_args=(), tags=_TAGS)
def _linear_weight_grad(
    grad2d: Tensor, x2d: Tensor, mask: Tensor, index: int, with_bias: bool
) -> tuple[Tensor, Tensor]:
    out_features = grad2d.shape[1] if with_bias else 0
    if bool(mask[index]):
        return grad2d.new_zeros(grad2d.shape[1], x2d.shape[1]), grad2d.new_zeros(out_features)
    rows = row_selection(mask, index)
    if rows is not None:
        grad_w, grad_b = _linear_weight_grad_rows(grad2d, x2d, rows, with_bias)
        return grad_w, grad_b if with_bias else grad2d.new_zeros(0)
    grad_bias = grad2d.sum(0) if with_bias else grad2d.new_zeros(0)
    return grad2d.t().mm(x2d), grad_bias


@_linear_weight_grad.register_fake
def _(grad2d, x2d, mask, index, with_bias):
    return grad2d.new_empty(grad2d.shape[1], x2d.shape[1]), grad2d.new_empty(
        grad2d.shape[1] if with_bias else 0
    )


@torch.library.custom_op("ldbfx::conv_backward", mutates_args=(), tags=_TAGS)
def _conv_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    index: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    want_input: bool,
    want_weight: bool,
    with_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The whole convolution backward in one call, as aten does it (computing dX and dW in two
    calls measured slower on CPU), with dW and db skipped when the layer is dropped. Outputs not
    wanted come back empty."""
    keep = not bool(mask[index])
    rows = row_selection(mask, index) if keep else None
    gx, gw, gb = _aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if with_bias else None, stride, padding, dilation,
        False, [0] * len(stride), groups,
        [want_input, want_weight and keep and rows is None, with_bias and keep and rows is None],
    )
    if rows is not None and (want_weight or with_bias):
        gw, gb = _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups, rows, with_bias)
    if gx is None:  # unwanted outputs: distinct empty tensors (outputs may not alias)
        gx = grad.new_empty(0)
    elif gx.stride() != x.stride():  # match the fake's layout (empty_like(x))
        gx = torch.empty_like(x).copy_(gx)
    if not want_weight:
        gw = grad.new_empty(0)
    elif gw is None:
        gw = torch.zeros_like(weight)
    elif gw.stride() != weight.stride():
        gw = torch.empty_like(weight).copy_(gw)
    if not with_bias:
        gb = grad.new_empty(0)
    elif gb is None:
        gb = grad.new_zeros(weight.shape[0])
    return gx, gw, gb


@_conv_backward.register_fake
def _(grad, x, weight, mask, index, stride, padding, dilation, groups, want_input, want_weight, with_bias):
    return (torch.empty_like(x) if want_input else grad.new_empty(0),
            torch.empty_like(weight) if want_weight else grad.new_empty(0),
            grad.new_empty(weight.shape[0]) if with_bias else grad.new_empty(0))


@torch.library.custom_op("ldbfx::embedding_weight_grad", mutates_args=(), tags=_TAGS)
def _embedding_weight_grad(
    grad: Tensor, indices: Tensor, mask: Tensor, index: int, num_weights: int,
    padding_idx: int, scale_grad_by_freq: bool,
) -> Tensor:
    if bool(mask[index]):
        return grad.new_zeros(num_weights, grad.shape[-1])
    return _aten.embedding_backward(
        grad, indices, num_weights, padding_idx, scale_grad_by_freq, False
    ).contiguous()


@_embedding_weight_grad.register_fake
def _(grad, indices, mask, index, num_weights, padding_idx, scale_grad_by_freq):
    return grad.new_empty(num_weights, grad.shape[-1])


@torch.library.custom_op("ldbfx::masked_grad", mutates_args=(), tags=_TAGS)
def _masked_grad(grad: Tensor, mask: Tensor, index: int) -> Tensor:
    return torch.zeros_like(grad) if bool(mask[index]) else grad.clone()


@_masked_grad.register_fake
def _(grad, mask, index):
    return torch.empty_like(grad)


# --------------------------------------------------------------------------------------------
# Linear family: F.linear and matmul with a parameter as the right operand.
# --------------------------------------------------------------------------------------------
class _Linear(torch.autograd.Function):
    """Compiled path. ``y = x @ W.T + b`` (``transposed=False``) or ``y = x @ W``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, index, transposed):
        out = torch.matmul(x, weight) if transposed else F.linear(x, weight, bias)
        ctx.index, ctx.transposed, ctx.x_shape = index, transposed, x.shape
        ctx.with_bias = bias is not None
        ctx.save_for_backward(x, weight, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.transposed else weight
            grad_x = grad2d.mm(w).view(ctx.x_shape)
        want_weight = ctx.needs_input_grad[1]
        want_bias = ctx.with_bias and ctx.needs_input_grad[2]
        if want_weight or want_bias:
            grad_w, grad_b = _linear_weight_grad(
                grad2d, x.reshape(-1, x.shape[-1]), mask, ctx.index, want_bias
            )
            grad_w = grad_w.t() if ctx.transposed else grad_w
        return (grad_x, grad_w if want_weight else None, grad_b if want_bias else None,
                None, None, None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, index: int) -> Tensor:
    """``F.linear`` whose weight and bias gradients are skipped while layer ``index`` is dropped."""
    if not _needs_grad(x, weight, bias):
        return F.linear(x, weight, bias)
    if not _opaque(mask, index):
        if _is_dropped(mask, index):
            return _dropped_output(F.linear(x, weight.detach(), _detach(bias)), mask, weight, bias)
        if (rows := row_selection(mask, index)) is not None and weight.requires_grad:
            x, weight, bias = _autocast(x, weight, bias)
            return _LinearRows.apply(x, weight, bias, rows)
        return F.linear(x, weight, bias)
    x, weight, bias = _autocast(x, weight, bias)
    return _Linear.apply(x, weight, bias, mask, index, False)


def matmul(x: Tensor, weight: Tensor, mask: Tensor, index: int) -> Tensor:
    """``x @ weight`` for a 2-D parameter ``weight``, masked like :func:`linear`."""
    if not _needs_grad(x, weight) or weight.dim() != 2 or x.dim() < 2:
        return torch.matmul(x, weight)
    if not _opaque(mask, index):
        if _is_dropped(mask, index):
            return _dropped_output(torch.matmul(x, weight.detach()), mask, weight)
        return torch.matmul(x, weight)
    x, weight = _autocast(x, weight)
    return _Linear.apply(x, weight, None, mask, index, True)


# --------------------------------------------------------------------------------------------
# Convolutions (1d/2d/3d, grouped, depthwise).
# --------------------------------------------------------------------------------------------
class _Conv(torch.autograd.Function):
    """Compiled path of :func:`conv`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, mask, index):
        out = _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.index, ctx.with_bias = index, bias is not None
        ctx.save_for_backward(x, weight, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = ctx.with_bias and ctx.needs_input_grad[2]
        if not (want_x or want_weight or want_bias):
            return None, None, None, None, None, None, None, None, None
        gx, gw, gb = _conv_backward(grad, x, weight, mask, ctx.index, stride, padding, dilation,
                                    groups, want_x, want_weight, want_bias)
        return (gx if want_x else None, gw if want_weight else None, gb if want_bias else None,
                None, None, None, None, None, None)


class _ConvInputGradOnly(torch.autograd.Function):
    """Eager path of a dropped convolution whose input needs a gradient.

    Autograd's own convolution node saves its input even when the weight is frozen. This one keeps
    only the weight and the input's geometry (shape, strides, dtype, device). Its backward makes the
    very call autograd makes for a frozen weight, ``convolution_backward(..., output_mask=[True,
    False, False])``, with an uninitialised stand-in for the input: dX reads the input's geometry
    (which also picks the kernel), never its values. So the values are bitwise those of freezing the
    same parameters on any CPU or GPU (same kernel, same arguments), and so are the FLOPs. The
    stand-in lives only during this backward call. (A stride-0 expanded placeholder made CPU kernels
    15-20% slower: they materialise it; an ``empty_strided`` one is already in the input's layout.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_geometry = (x.shape, x.stride(), x.dtype, x.device)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.save_for_backward(weight)
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        shape, strides, dtype, device = ctx.x_geometry
        # requires_grad as autograd's saved input has it: backend selection may look at it.
        stand_in = torch.empty_strided(shape, strides, dtype=dtype, device=device, requires_grad=True)
        grad_x = _aten.convolution_backward(
            grad, stand_in, weight, ctx.bias_sizes, stride, padding, dilation, False, [0] * len(stride),
            groups, [True, False, False])[0]
        return grad_x, None, None, None, None, None, None


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    mask: Tensor,
    index: int,
) -> Tensor:
    """``F.conv{1,2,3}d`` (numeric padding) with weight/bias gradients skipped when dropped."""
    n = weight.dim() - 2
    if not _needs_grad(x, weight, bias):
        return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
    if not _opaque(mask, index):
        if not _is_dropped(mask, index):
            rows = row_selection(mask, index)
            if rows is None or not weight.requires_grad:
                return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
            unbatched = x.dim() == n + 1
            x, weight, bias = _autocast(x.unsqueeze(0) if unbatched else x, weight, bias)
            out = _ConvRows.apply(x, weight, bias, stride, padding, dilation, groups, rows)
            return out.squeeze(0) if unbatched else out
        params = (weight, bias)
        weight, bias = weight.detach(), _detach(bias)
        if not x.requires_grad or x.dim() == n + 1:
            out = _CONV[n](x, weight, bias, stride, padding, dilation, groups)
        else:
            # Autocast would cast inside F.conv*d; cast here so dX comes back in x's own dtype.
            x_cast, weight, bias = _autocast(x, weight, bias)
            out = _ConvInputGradOnly.apply(x_cast, weight, bias, stride, padding, dilation, groups)
        return _dropped_output(out, mask, *params)
    unbatched = x.dim() == n + 1
    if unbatched:  # what F.conv*d does internally for an unbatched input
        x = x.unsqueeze(0)
    x, weight, bias = _autocast(x, weight, bias)
    out = _Conv.apply(x, weight, bias, stride, padding, dilation, groups, mask, index)
    return out.squeeze(0) if unbatched else out


# --------------------------------------------------------------------------------------------
# Embedding: the weight gradient is the op's whole backward.
# --------------------------------------------------------------------------------------------
class _Embedding(torch.autograd.Function):
    """Compiled path of :func:`embedding`."""

    @staticmethod
    def forward(ctx, indices, weight, padding_idx, scale_grad_by_freq, mask, index):
        out = F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
        # F.embedding's own normalisation: None -> -1, negative -> counted from the end.
        if padding_idx is None:
            padding_idx = -1
        elif padding_idx < 0:
            padding_idx += weight.shape[0]
        ctx.num_weights, ctx.index = weight.shape[0], index
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        ctx.save_for_backward(indices, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        indices, mask = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _embedding_weight_grad(grad, indices, mask, ctx.index, ctx.num_weights,
                                            ctx.padding_idx, ctx.scale_grad_by_freq)
        return None, grad_w, None, None, None, None


def embedding(
    indices: Tensor, weight: Tensor, padding_idx: int | None, scale_grad_by_freq: bool,
    mask: Tensor, index: int,
) -> Tensor:
    """``F.embedding`` (no ``max_norm``, dense gradient) whose weight gradient is maskable."""
    if not _needs_grad(weight):
        return F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
    if not _opaque(mask, index):
        if _is_dropped(mask, index):
            out = F.embedding(indices, weight.detach(), padding_idx, None, 2.0, scale_grad_by_freq, False)
            return _dropped_output(out, mask, weight)
        return F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
    return _Embedding.apply(indices, weight, padding_idx, scale_grad_by_freq, mask, index)


# --------------------------------------------------------------------------------------------
# Any other use of a parameter: gate its gradient. The consuming op still computes it (norms,
# additive embeddings, scales: cheap), but a dropped layer's parameter gets no gradient.
# --------------------------------------------------------------------------------------------
class _MaskedParam(torch.autograd.Function):
    """Compiled path of :func:`masked_param`: an identity whose gradient reads the mask."""

    @staticmethod
    def forward(ctx, param, mask, index):
        ctx.index = index
        ctx.save_for_backward(mask)
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _masked_grad(grad, mask, ctx.index), None, None


def masked_param(param: Tensor, mask: Tensor, index: int) -> Tensor:
    """Returns ``param`` itself, but its gradient is dropped while layer ``index`` is dropped."""
    if not _needs_grad(param):
        return param
    if not _opaque(mask, index):
        if not _is_dropped(mask, index):
            return param
        if _dense(mask):  # marked dirty there: a copy, never an alias (the parameter's version)
            return _dropped_output(param.detach().clone(), mask, param)
        return param.detach()
    return _MaskedParam.apply(param, mask, index)


def batch_norm(module: torch.nn.modules.batchnorm._BatchNorm, x: Tensor,
               weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``module(x)`` for a BatchNorm module, with ``weight``/``bias`` standing for its affine
    parameters. Mirrors ``_BatchNorm.forward`` line for line, so running statistics and
    ``num_batches_tracked`` evolve exactly as in the original module."""
    if module.momentum is None:
        factor = 0.0
    else:
        factor = module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    if module.training:
        bn_training = True
    else:
        bn_training = module.running_mean is None and module.running_var is None
    use_stats = not module.training or module.track_running_stats
    return F.batch_norm(
        x,
        module.running_mean if use_stats else None,
        module.running_var if use_stats else None,
        weight, bias, bn_training, factor, module.eps,
    )


def module_call(module: torch.nn.Module, params: dict[str, Tensor], args: tuple, kwargs: dict):
    """Calls a leaf module with some of its parameters replaced (``torch.func.functional_call``).

    The generic path for leaf modules ldbfx has no dedicated handler for: correct semantics, no
    saved compute.
    """
    if not torch.is_grad_enabled():
        return module(*args, **kwargs)
    return torch.func.functional_call(module, params, args, kwargs, strict=False)


# --------------------------------------------------------------------------------------------
# Functions that call F.linear on parameters internally (torchvision's shifted_window_attention).
# --------------------------------------------------------------------------------------------
class _RouteLinears(torch.overrides.TorchFunctionMode):
    """Sends every ``F.linear`` called while active to :func:`linear` for one layer.

    For functions recorded as one node (``torch.fx.wrap``) that compute their projections with
    ``F.linear``. It does not reach functions that dispatch themselves through
    ``handle_torch_function`` (``F.multi_head_attention_forward``): the mode is popped before
    their body runs, which is why multi-head attention has its own implementation below.
    """

    def __init__(self, mask: Tensor, index: int):
        super().__init__()
        self.mask, self.index = mask, index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return linear(x, weight, bias, self.mask, self.index)
        return func(*args, **kwargs)


_ROUTED: dict[str, object] = {}


def _function(qualified_name: str):
    fn = _ROUTED.get(qualified_name)
    if fn is None:
        module, _, name = qualified_name.rpartition(".")
        fn = _ROUTED[qualified_name] = getattr(importlib.import_module(module), name)
    return fn


def routed_call(function: str, mask: Tensor, index: int, *args, **kwargs):
    """``function(*args, **kwargs)`` with the ``F.linear`` calls inside masked as layer ``index``.

    ``function`` is a qualified name (a graph can only print importable references).
    """
    fn = _function(function)
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    with _RouteLinears(mask, index):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention: the module's non-fast path, op for op, with masked projections.
# Adapted from torch.nn.MultiheadAttention.forward and F.multi_head_attention_forward (BSD).
# --------------------------------------------------------------------------------------------
def multi_head_attention(module: torch.nn.MultiheadAttention, mask: Tensor, index: int,
                         query: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask: Tensor | None = None, need_weights: bool = True,
                         attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False):
    """``module(query, key, value, ...)`` with its projection weight gradients maskable."""
    m = module
    if not _needs_grad(query, key, value, m.in_proj_weight, m.q_proj_weight, m.out_proj.weight):
        # Inference: the module itself, fast path included, so eval outputs stay identical.
        return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                 attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=query.dtype, check_other=False,
    )
    if m.batch_first and is_batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = _mha_forward(m, mask, index, query, key, value, key_padding_mask, need_weights,
                                attn_mask, average_attn_weights, is_causal)
    if m.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


def _mha_forward(m, mask, index, query, key, value, key_padding_mask, need_weights, attn_mask,
                 average_attn_weights, is_causal):
    num_heads, dropout_p = m.num_heads, m.dropout if m.training else 0.0
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False
    head_dim = embed_dim // num_heads

    def proj(x, w, b):
        return linear(x, w, b, mask, index)

    if m._qkv_same_embed_dim:  # F._in_projection_packed
        w, b = m.in_proj_weight, m.in_proj_bias
        if key is value and query is key:
            p = proj(query, w, b)
            p = p.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = p[0], p[1], p[2]
        elif key is value:
            w_q, w_kv = w.split([embed_dim, embed_dim * 2])
            b_q, b_kv = (None, None) if b is None else b.split([embed_dim, embed_dim * 2])
            q = proj(query, w_q, b_q)
            kv = proj(key, w_kv, b_kv)
            kv = kv.unflatten(-1, (2, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            k, v = kv[0], kv[1]
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            q, k, v = proj(query, w_q, b_q), proj(key, w_k, b_k), proj(value, w_v, b_v)
    else:  # F._in_projection
        b_q, b_k, b_v = (None, None, None) if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
        q = proj(query, m.q_proj_weight, b_q)
        k = proj(key, m.k_proj_weight, b_k)
        v = proj(value, m.v_proj_weight, b_v)
    src_len = k.shape[0]
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, masked_param(m.bias_k, mask, index).repeat(1, bsz, 1)])
        v = torch.cat([v, masked_param(m.bias_v, mask, index).repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if m.add_zero_attn:
        zero_attn_shape = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    out_w, out_b = m.out_proj.weight, m.out_proj.bias
    if need_weights:
        _, _, e = q.shape
        q_scaled = q * math.sqrt(1.0 / float(e))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = proj(out, out_w, out_b)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = proj(out, out_w, out_b)
    out = out.view(tgt_len, bsz, out.size(1))
    if not is_batched:
        out = out.squeeze(1)
    return out, None
