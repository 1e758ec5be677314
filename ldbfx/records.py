"""The records of a transformed model: :class:`Layer`, :class:`Branch`, :class:`TransformConfig` and
the :class:`Capture` that holds them.

Frozen dataclasses that :func:`ldbfx.transform` builds (the layers, the residual branches) or
records (its options), stored on the module it returns as ``gm.ldbfx_capture``. They import
nothing else of ldbfx, so the run time (:mod:`ldbfx.runtime.module`, :mod:`ldbfx.runtime.mask`)
can name them without importing the graph pass that computes them (:mod:`ldbfx.analysis.layers`,
:mod:`ldbfx.analysis.branches`, :mod:`ldbfx.rewrite.driver`), which
re-export them under their old paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Layer", "Branch", "TransformConfig", "Filter", "Capture"]

Filter = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Layer:
    """One droppable unit of a transformed model.

    Attributes:
        index: position in topological order (what :func:`ldbfx.set_dropped` accepts).
        name: unique readable name: the module's qualified name for a module call, else the
            owning module's name or the parameter's own name (``"cls_token"``).
        params: qualified names of its parameters, as in ``model.named_parameters()``.
        eligible: whether :func:`ldbfx.set_dropped` may drop it.
        reason: why it is not eligible (``"first 4"``, ``"last 1"``, ``"filter"``, ``"frozen"``),
            empty when eligible.
        op: the FX op of its first node (``"call_module"`` or ``"call_function"``...).
        type: the module class (``"Conv2d"``) or the function (``"linear"``) of its first node.
        kind: the handler family: ``conv``, ``linear``, ``matmul``, ``embedding``, ``attention``
            (weight gradient really skipped) or ``norm``, ``module``, ``param`` (gradient gated).
        saves_compute: whether dropping skips weight-gradient computation (every node's handler
            owns its backward) or only discards the gradient.
        numel: number of parameter elements.
        nodes: names of its nodes in the traced (train-mode) graph.
    """

    index: int
    name: str
    params: tuple[str, ...]
    eligible: bool
    reason: str
    op: str
    type: str
    kind: str
    saves_compute: bool
    numel: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Branch:
    """One droppable residual branch of a transformed model.

    Attributes:
        index: position in topological order of its add (what :func:`set_dropped_branches` takes).
        name: unique readable name: its block (``"layer2.0"``), plus the branch's own submodule
            when the block has several (``"blocks.3.attn"``, ``"blocks.3.mlp"``).
        block: qualified name of the module whose ``forward`` performs the add ("" for the root).
        layers: names of the layers inside the branch, as :func:`ldbfx.layers` names them.
        skip_layers: layers on the skip path (a projection shortcut), usually ``()``.
        eligible: whether :func:`set_dropped_branches` may drop it.
        reason: why not (``"first block"``, ``"last block"``, ``"filter"``), empty when eligible.
        node: name of the add node in the traced (train-mode) graph.
    """

    index: int
    name: str
    block: str
    layers: tuple[str, ...]
    skip_layers: tuple[str, ...]
    eligible: bool
    reason: str
    node: str


@dataclass(frozen=True)
class TransformConfig:
    """Options of :func:`transform` (frozen, so torch.compile never sees it change).

    Attributes:
        keep_first: the first layers in topological order that always train. Default: ``4``.
        keep_last: the last layers that always train. Default: ``1``.
        filter: ``(module, name) -> bool``; layers for which it returns False always train.
            ``module`` is the leaf module called, or the module owning the parameter for a
            functional use. Default: ``None`` (no filter).
        keep_first_blocks: residual branches of the first blocks that always train. Default: ``1``.
        keep_last_blocks: residual branches of the last blocks that always train. Default: ``1``.
        branch_filter: ``(ldbfx.Branch) -> bool``; branches for which it returns False always
            train. Default: ``None``.
        extra_branches: names of layers, one inside each residual branch the discovery rule
            misses or orients the wrong way (see :mod:`ldbfx.analysis.branches`). Default: ``()``.
    """

    keep_first: int = 4
    keep_last: int = 1
    filter: Filter | None = None
    keep_first_blocks: int = 1
    keep_last_blocks: int = 1
    branch_filter: Callable[[Branch], bool] | None = None
    extra_branches: tuple[str, ...] = ()

    def __post_init__(self):
        names = self.extra_branches
        if not isinstance(names, str) and isinstance(names, Iterable):
            names = tuple(names)
        if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
            raise TypeError("extra_branches must be a list of layer names (as ldbfx.layers names them), "
                            f"got {self.extra_branches!r}")
        object.__setattr__(self, "extra_branches", names)  # frozen: a tuple, hashable
        if self.branch_filter is not None and not callable(self.branch_filter):
            raise TypeError(f"branch_filter must be a callable (ldbfx.Branch) -> bool, got {self.branch_filter!r}")
        for name in ("keep_first", "keep_last", "keep_first_blocks", "keep_last_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.filter is not None and not callable(self.filter):
            raise TypeError(f"filter must be a callable (module, name) -> bool, got {self.filter!r}")


@dataclass(frozen=True, eq=False)
class Capture:
    """What :func:`ldbfx.transform` captured and decided: fixed for the life of the transformed
    module, which keeps it as ``gm.ldbfx_capture`` (what changes at run time, the masks and what
    the optimizer hook reads, is ``gm.ldbfx_state``, an :class:`ldbfx.state.LdbState`).

    Attributes:
        layers: the layers, in topological order (``layers[i].index == i``).
        branches: the residual branches, in topological order of their adds.
        edges: ``(i, j)`` where data flows from layer ``i`` to layer ``j`` without crossing another.
        config: the options of :func:`ldbfx.transform`.
        eval_graph: the eval-mode graph where the model's modes trace differently, else None.
        autocast: for a ``torch.export`` capture, the autocast it ran under (the graph fixes the
            dtypes it saw: each eager call checks it); None for ``torch.fx``.
        placement: ``(module, name, device, dtype)`` of the model's first parameter when captured
            (an exported graph refuses to run once the model has moved), or None.
        model_modules: the model's own modules (an exported graph checks their train/eval modes).
        snapshot: what :func:`ldbfx.module.changes_since_capture` compares: module and parameter
            identities, hooks, placement and a Hugging Face config's values, as captured.
        layer_index: layer name -> index; ``branch_index``: branch name -> index.
    """

    layers: tuple[Layer, ...]
    branches: tuple[Branch, ...]
    edges: tuple[tuple[int, int], ...]
    config: TransformConfig
    eval_graph: fx.Graph | None
    autocast: tuple | None
    placement: tuple[nn.Module, str, torch.device, torch.dtype] | None
    model_modules: tuple[nn.Module, ...]
    snapshot: Mapping[str, Any]
    layer_index: Mapping[str, int]
    branch_index: Mapping[str, int]

    @property
    def exported(self) -> bool:
        """Whether the graph was captured by ``torch.export`` (which fixes modes, devices, dtypes)."""
        return self.autocast is not None
