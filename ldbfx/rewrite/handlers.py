"""One handler per op family: how a parameterized node is rewritten so its gradient is maskable.

A handler says which nodes it takes (``match``) and emits the replacement (``rewrite``). Handlers
for convolutions, linears, matmuls, embeddings and multi-head attention own the layer's backward
and really skip its weight-gradient FLOPs; the norm handlers and the generic fallbacks only gate the
gradient (the consuming op computes it anyway, which for norms is cheap).

New families plug in with :func:`register_module_handler` / :func:`register_function_handler`.
A subclass of ``nn.Linear`` that keeps Linear's ``forward`` can reuse the linear handler::

    ldbfx.handlers.register_module_handler(MyLinear, ldbfx.handlers.LINEAR_MODULE)

A module with its own ``forward`` needs a handler of its own (docs/extending.md): the linear
handler matches only modules that compute what ``nn.Linear.forward`` computes.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import ops
from ..runtime.module import MASK_ATTR
from ..capture.trace import has_hooks

__all__ = [
    "Handler", "register_module_handler", "register_function_handler", "module_handler",
    "function_handler", "LINEAR_MODULE",
    # What the pass driver (ldbfx.rewrite.driver) runs the handlers with.
    "Rewriter", "GENERIC_PARAM", "param_of",
]


@dataclass(frozen=True)
class Handler:
    """How one op family is rewritten.

    Attributes:
        kind: short name shown by :func:`ldbfx.layers` and :func:`ldbfx.summary`.
        saves_compute: whether dropping the layer skips its weight-gradient computation.
        match: ``(node, module_or_function, root) -> bool``; a handler may decline a node it cannot
            reproduce exactly (unusual padding, ``max_norm``), which then takes the generic path.
        rewrite: ``(rewriter, node, layer_index) -> fx.Node``, the replacement, inserted before
            ``node``.
    """

    kind: str
    saves_compute: bool
    match: Callable[[fx.Node, Any, nn.Module], bool]
    rewrite: Callable[[Rewriter, fx.Node, int], fx.Node]


class Rewriter:
    """Emits replacement nodes into one graph (what handlers receive)."""

    def __init__(self, graph: fx.Graph, root: nn.Module):
        self.graph, self.root = graph, root
        # Before the first node that is not an input: torch.export graphs read parameters
        # (get_attr) before their inputs, and gated parameters must see the mask defined.
        first = next((n for n in graph.nodes if n.op != "placeholder"), None)
        with graph.inserting_before(first):
            self.mask = graph.get_attr(MASK_ATTR)
        self._masked: dict[tuple[fx.Node, int], fx.Node] = {}

    def call(self, fn: Callable, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs or {})

    def param(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def module(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def masked(self, param: fx.Node, index: int) -> fx.Node:
        """``ops.masked_param(param)``, created once per parameter node and layer."""
        key = (param, index)
        if key not in self._masked:
            with self.graph.inserting_after(param):
                self._masked[key] = self.call(ops.masked_param, (param, self.mask, index))
        return self._masked[key]


_MODULE_HANDLERS: list[tuple[type, Handler]] = []
_FUNCTION_HANDLERS: dict[Any, Handler] = {}


def register_module_handler(module_type: type, handler: Handler) -> None:
    """Registers ``handler`` for leaf modules of ``module_type`` (newest registration wins)."""
    _MODULE_HANDLERS.insert(0, (module_type, handler))


def register_function_handler(function: Any, handler: Handler) -> None:
    """Registers ``handler`` for ``call_function`` nodes with this target (the function itself,
    or its qualified name ``"package.module.function"``, which avoids importing it)."""
    _FUNCTION_HANDLERS[function] = handler


def module_handler(node: fx.Node, module: nn.Module, root: nn.Module) -> Handler | None:
    if has_hooks(module):
        # Its hooks must run (weight_norm's old pre-hook computes the weight): call the module
        # itself, with gated parameters. Correct, but without savings.
        return GENERIC_MODULE
    for module_type, handler in _MODULE_HANDLERS:
        if isinstance(module, module_type) and handler.match(node, module, root):
            return handler
    return None


def function_handler(node: fx.Node, root: nn.Module) -> Handler | None:
    if node.op != "call_function":
        return None
    handler = _FUNCTION_HANDLERS.get(node.target)
    if handler is None:  # registered by qualified name, so ldbfx never imports torchvision
        target = node.target
        handler = _FUNCTION_HANDLERS.get(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    if handler is not None and handler.match(node, node.target, root):
        return handler
    return None


# ---------------------------------------------------------------------------------------------
# Argument helpers
# ---------------------------------------------------------------------------------------------
def _bind_module(node: fx.Node, module: nn.Module) -> dict[str, Any]:
    return dict(inspect.signature(module.forward).bind(*node.args, **node.kwargs).arguments)


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Binds a functional call's arguments to ``names`` (aten builtins have no Python signature)."""
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound if all(n in bound for n in names) else None


def param_of(arg: Any, root: nn.Module) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, or None (other node, buffer, trace-time constant)."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    obj = root
    for atom in arg.target.split("."):
        obj = getattr(obj, atom, None)  # trace-time constants live on the graph module only
    return obj if isinstance(obj, nn.Parameter) else None


def _is_param(arg: Any, root: nn.Module) -> bool:
    return param_of(arg, root) is not None


def _same_forward(module: nn.Module, base: type, *methods: str) -> bool:
    """True when ``module`` runs ``base``'s own code (a subclass may override ``forward``)."""
    return all(getattr(type(module), m) is getattr(base, m) for m in ("forward", *methods))


def _numeric_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]):
    """Converts ``'valid'``/``'same'`` to symmetric numeric padding, or None if asymmetric."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None
    return padding


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------
def _linear_module_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    module = rw.root.get_submodule(node.target)
    x = _bind_module(node, module)["input"]
    bias = rw.param(f"{node.target}.bias") if module.bias is not None else None
    return rw.call(ops.linear, (x, rw.param(f"{node.target}.weight"), bias, rw.mask, index))


LINEAR_MODULE = Handler(
    "linear", True, lambda node, m, root: _same_forward(m, nn.Linear), _linear_module_rewrite
)
register_module_handler(nn.Linear, LINEAR_MODULE)

_LINEAR_ARGS = ("input", "weight", "bias")


def _linear_function_match(node: fx.Node, fn: Any, root: nn.Module) -> bool:
    args = _bind(node, _LINEAR_ARGS, {"bias": None})
    return args is not None and _is_param(args["weight"], root) and (
        args["bias"] is None or _is_param(args["bias"], root)
    )


def _linear_function_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    args = _bind(node, _LINEAR_ARGS, {"bias": None})
    return rw.call(ops.linear, (args["input"], args["weight"], args["bias"], rw.mask, index))


register_function_handler(
    F.linear, Handler("linear", True, _linear_function_match, _linear_function_rewrite)
)


def _matmul_match(node: fx.Node, fn: Any, root: nn.Module) -> bool:
    if len(node.args) != 2 or node.kwargs:
        return False
    x, weight = node.args
    return _is_param(weight, root) and not _is_param(x, root) and root.get_parameter(
        weight.target
    ).dim() == 2


def _matmul_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    x, weight = node.args
    return rw.call(ops.matmul, (x, weight, rw.mask, index))


_MATMUL = Handler("matmul", True, _matmul_match, _matmul_rewrite)
for _fn in (torch.matmul, operator.matmul, torch.mm):
    register_function_handler(_fn, _MATMUL)


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------
_CONV_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_module_base(module: nn.Module) -> type | None:
    for base in _CONV_BASES:
        if isinstance(module, base) and _same_forward(module, base, "_conv_forward"):
            return base
    return None


def _conv_module_match(node: fx.Node, module: nn.Module, root: nn.Module) -> bool:
    if _conv_module_base(module) is None:
        return False
    if module.padding_mode != "zeros":
        return True  # explicit F.pad, then padding 0 (what the module itself does)
    return _numeric_padding(module.padding, module.kernel_size, module.dilation) is not None


def _conv_module_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    module = rw.root.get_submodule(node.target)
    n = len(module.kernel_size)
    x = _bind_module(node, module)["input"]
    if module.padding_mode != "zeros":
        x = rw.call(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        padding = (0,) * n
    else:
        padding = _numeric_padding(module.padding, module.kernel_size, module.dilation)
    bias = rw.param(f"{node.target}.bias") if module.bias is not None else None
    return rw.call(ops.conv, (
        x, rw.param(f"{node.target}.weight"), bias, tuple(module.stride), tuple(padding),
        tuple(module.dilation), module.groups, rw.mask, index,
    ))


register_module_handler(nn.modules.conv._ConvNd, Handler("conv", True, _conv_module_match, _conv_module_rewrite))

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _conv_function_args(node: fx.Node, root: nn.Module) -> dict[str, Any] | None:
    args = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
    if args is None or not _is_param(args["weight"], root):
        return None
    if args["bias"] is not None and not _is_param(args["bias"], root):
        return None
    if any(isinstance(args[k], fx.Node) for k in ("stride", "padding", "dilation", "groups")):
        return None
    kernel = tuple(root.get_parameter(args["weight"].target).shape[2:])
    n = len(kernel)
    dilation = _tuple(args["dilation"], n)
    padding = _numeric_padding(args["padding"], kernel, dilation)
    if padding is None:
        return None
    args.update(stride=_tuple(args["stride"], n), padding=_tuple(padding, n), dilation=dilation)
    return args


def _conv_function_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    a = _conv_function_args(node, rw.root)
    return rw.call(ops.conv, (a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                              a["dilation"], a["groups"], rw.mask, index))


_CONV_FUNCTION = Handler(
    "conv", True, lambda node, fn, root: _conv_function_args(node, root) is not None,
    _conv_function_rewrite,
)
for _fn in (F.conv1d, F.conv2d, F.conv3d):
    register_function_handler(_fn, _CONV_FUNCTION)


# ---------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------
def _embedding_module_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    module = rw.root.get_submodule(node.target)
    x = _bind_module(node, module)["input"]
    return rw.call(ops.embedding, (x, rw.param(f"{node.target}.weight"), module.padding_idx,
                                   module.scale_grad_by_freq, rw.mask, index))


register_module_handler(nn.Embedding, Handler(
    "embedding", True,
    lambda node, m, root: _same_forward(m, nn.Embedding) and m.max_norm is None and not m.sparse,
    _embedding_module_rewrite,
))

_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_EMBEDDING_DEFAULTS = {"padding_idx": None, "max_norm": None, "norm_type": 2.0,
                       "scale_grad_by_freq": False, "sparse": False}


def _embedding_function_match(node: fx.Node, fn: Any, root: nn.Module) -> bool:
    a = _bind(node, _EMBEDDING_ARGS, _EMBEDDING_DEFAULTS)
    return (a is not None and _is_param(a["weight"], root) and a["max_norm"] is None
            and a["sparse"] is False and not isinstance(a["padding_idx"], fx.Node)
            and isinstance(a["scale_grad_by_freq"], bool))


def _embedding_function_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    a = _bind(node, _EMBEDDING_ARGS, _EMBEDDING_DEFAULTS)
    return rw.call(ops.embedding, (a["input"], a["weight"], a["padding_idx"],
                                   a["scale_grad_by_freq"], rw.mask, index))


register_function_handler(
    F.embedding, Handler("embedding", True, _embedding_function_match, _embedding_function_rewrite)
)


# ---------------------------------------------------------------------------------------------
# ATen forms: what a torch.export graph holds (ldbfx.export). Same ops of ldbfx.ops as above.
# ---------------------------------------------------------------------------------------------
_aten = torch.ops.aten
register_function_handler(_aten.linear.default, Handler("linear", True, _linear_function_match,
                                                        _linear_function_rewrite))
for _op in (_aten.matmul.default, _aten.mm.default):
    register_function_handler(_op, _MATMUL)
for _packet in (_aten.conv1d, _aten.conv2d, _aten.conv3d):
    for _overload in ("default", "padding"):
        register_function_handler(getattr(_packet, _overload), _CONV_FUNCTION)



def _addmm_match(node: fx.Node, fn: Any, root: nn.Module) -> bool:
    """``aten.addmm(bias, x, weight)`` with both parameters, default ``beta``/``alpha`` (GPT-2's
    ``Conv1D``: ``torch.addmm(self.bias, x.view(-1, nx), self.weight)``)."""
    if len(node.args) != 3 or node.kwargs:
        return False
    bias, x, weight = node.args
    return (_is_param(bias, root) and _is_param(weight, root) and not _is_param(x, root)
            and root.get_parameter(weight.target).dim() == 2 and root.get_parameter(bias.target).dim() == 1)


def _addmm_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    bias, x, weight = node.args
    return rw.call(ops.addmm, (bias, x, weight, rw.mask, index))


# Kind "matmul", like x @ W: no ChannelDropBack rows for it (ops.addmm has no rows path).
register_function_handler(_aten.addmm.default, Handler("matmul", True, _addmm_match, _addmm_rewrite))

# aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
# weight first, and -1 (not None) for "no padding index".
_ATEN_EMBEDDING_ARGS = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse")
_ATEN_EMBEDDING_DEFAULTS = {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False}


def _aten_embedding_match(node: fx.Node, fn: Any, root: nn.Module) -> bool:
    a = _bind(node, _ATEN_EMBEDDING_ARGS, _ATEN_EMBEDDING_DEFAULTS)
    return (a is not None and _is_param(a["weight"], root) and a["sparse"] is False
            and isinstance(a["padding_idx"], int) and isinstance(a["scale_grad_by_freq"], bool))


def _aten_embedding_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    a = _bind(node, _ATEN_EMBEDDING_ARGS, _ATEN_EMBEDDING_DEFAULTS)
    # aten's -1 means "none"; F.embedding (what ops.embedding calls) would read -1 as the last row.
    padding_idx = None if a["padding_idx"] == -1 else a["padding_idx"]
    return rw.call(ops.embedding, (a["input"], a["weight"], padding_idx, a["scale_grad_by_freq"],
                                   rw.mask, index))


register_function_handler(_aten.embedding.default, Handler(
    "embedding", True, _aten_embedding_match, _aten_embedding_rewrite))


# ---------------------------------------------------------------------------------------------
# Multi-head attention (torchvision's ViT): in/out projections are most of its dW FLOPs.
# ---------------------------------------------------------------------------------------------
def _mha_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    return rw.call(ops.multi_head_attention, (rw.module(node.target), rw.mask, index, *node.args),
                   dict(node.kwargs))


register_module_handler(nn.MultiheadAttention, Handler(
    "attention", True, lambda node, m, root: _same_forward(m, nn.MultiheadAttention), _mha_rewrite
))


# ---------------------------------------------------------------------------------------------
# Wrapped functions that compute projections with F.linear inside (torch.fx.wrap'd attention).
# ---------------------------------------------------------------------------------------------
def _routed_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    def gate(arg):  # non-linear uses of the layer's parameters (logit scales, biases) are gated
        return rw.masked(arg, index) if _is_param(arg, rw.root) else arg

    args = tuple(gate(a) for a in node.args)
    kwargs = {k: gate(v) for k, v in node.kwargs.items()}
    name = f"{node.target.__module__}.{node.target.__qualname__}"
    return rw.call(ops.routed_call, (name, rw.mask, index, *args), kwargs)


ROUTED_FUNCTION = Handler("attention", True, lambda node, fn, root: True, _routed_rewrite)
for _name in ("shifted_window_attention", "shifted_window_attention_3d"):
    register_function_handler(f"torchvision.models.swin_transformer.{_name}", ROUTED_FUNCTION)
    register_function_handler(f"torchvision.models.video.swin_transformer.{_name}", ROUTED_FUNCTION)


# ---------------------------------------------------------------------------------------------
# Norms: exact functional forms with gated affine parameters (no FLOPs to save to speak of).
# ---------------------------------------------------------------------------------------------
def _affine(rw: Rewriter, node: fx.Node, index: int, module: nn.Module) -> tuple:
    return tuple(
        rw.masked(rw.param(f"{node.target}.{name}"), index) if getattr(module, name) is not None else None
        for name in ("weight", "bias")
    )


def _batch_norm_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    module = rw.root.get_submodule(node.target)
    x = _bind_module(node, module)["input"]
    return rw.call(ops.batch_norm, (rw.module(node.target), x, *_affine(rw, node, index, module)))


register_module_handler(nn.modules.batchnorm._BatchNorm, Handler(
    "norm", False,
    lambda node, m, root: _same_forward(m, nn.modules.batchnorm._BatchNorm)
    and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    _batch_norm_rewrite,
))


def _register_functional_norm(module_type: type, function: Callable, config: str) -> None:
    """``module(x)`` -> ``function(x, module.<config>, weight, bias, module.eps)`` (gated affine)."""

    def rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
        module = rw.root.get_submodule(node.target)
        x = _bind_module(node, module)["input"]
        weight, bias = _affine(rw, node, index, module)
        return rw.call(function, (x, getattr(module, config), weight, bias, module.eps))

    register_module_handler(module_type, Handler(
        "norm", False, lambda node, m, root: _same_forward(m, module_type), rewrite
    ))


_register_functional_norm(nn.LayerNorm, F.layer_norm, "normalized_shape")
_register_functional_norm(nn.GroupNorm, F.group_norm, "num_groups")


# ---------------------------------------------------------------------------------------------
# Fallbacks: any other leaf module, any other use of a parameter.
# ---------------------------------------------------------------------------------------------
def _generic_module_rewrite(rw: Rewriter, node: fx.Node, index: int) -> fx.Node:
    module = rw.root.get_submodule(node.target)
    params = {
        name: rw.masked(rw.param(f"{node.target}.{name}"), index)
        for name, _ in module.named_parameters()
    }
    return rw.call(ops.module_call, (rw.module(node.target), params, tuple(node.args), dict(node.kwargs)))


GENERIC_MODULE = Handler("module", False, lambda node, m, root: True, _generic_module_rewrite)
# A parameter consumed by an op without a handler: its get_attr is wrapped by ops.masked_param.
GENERIC_PARAM = Handler("param", False, lambda node, fn, root: True, lambda rw, node, index: node)
