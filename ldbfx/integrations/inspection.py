"""Inspection: the layer table, per-layer weight-gradient and per-branch FLOPs, and the layer DAG.

networkx is imported inside :func:`to_networkx` only, so ``import ldbfx`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..analysis.layers import layers as _layers
from ..runtime.branch_mask import branches, set_dropped_branches
from ..runtime.measure import Probe, measuring

if TYPE_CHECKING:
    import networkx

    from ..runtime.module import LdbGraphModule

__all__ = ["FlopReport", "BranchFlopReport", "weight_grad_flops", "branch_flops", "summary", "to_networkx"]

_aten = torch.ops.aten
# Ops whose forward FLOPs equal the weight-gradient FLOPs of the parameter they consume.
# bmm/baddbmm are left out: inside attention they multiply activations, not weights.
_WEIGHT_OPS = {_aten.mm, _aten.addmm, _aten.convolution, _aten._convolution}


@dataclass(frozen=True)
class FlopReport:
    """Weight-gradient FLOPs per layer and the backward FLOPs of the whole model.

    Attributes:
        weight_grad: FLOPs of each layer's weight gradient (indexed like ``ldbfx.layers(gm)``);
            0 for layers whose dropping saves no compute (norms, gated parameters).
        backward: FLOPs of one full backward pass (nothing dropped), as FlopCounterMode counts.
    """

    weight_grad: tuple[int, ...]
    backward: int

    def share(self, index: int) -> float:
        """Fraction of the backward FLOPs that dropping layer ``index`` skips."""
        return self.weight_grad[index] / self.backward if self.backward else 0.0


class _LayerFlops(TorchDispatchMode):
    def __init__(self, n: int):
        super().__init__()
        self.current: int | None = None
        self.flops = [0] * n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if self.current is not None and packet in _WEIGHT_OPS and packet in flop_registry:
            shapes = torch.utils._pytree.tree_map(
                lambda t: t.shape if isinstance(t, torch.Tensor) else t, (args, kwargs, out)
            )
            self.flops[self.current] += flop_registry[packet](*shapes[0], **shapes[1], out_val=shapes[2])
        return out


class _Attributing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: _LayerFlops):
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        info = n.meta.get("ldbfx")
        self.counter.current = info["layer"] if info and info["kind"] != "norm" else None
        try:
            return super().run_node(n)
        finally:
            self.counter.current = None


def _graph_inputs(gm: LdbGraphModule, args: tuple, kwargs: dict) -> tuple:
    """The graph's placeholders' values for the call ``gm(*args, **kwargs)``."""
    spec = gm.__dict__.get("_in_spec")
    if spec is not None:  # torch.export graphs take the flattened inputs
        from torch.fx import _pytree as fx_pytree

        return tuple(fx_pytree.tree_flatten_spec((args, kwargs), spec))
    if not kwargs:
        return args
    import inspect

    return tuple(inspect.signature(gm.forward).bind(*args, **kwargs).arguments.values())


def weight_grad_flops(gm: LdbGraphModule, *inputs: Any, **kwinputs: Any) -> FlopReport:
    """Measures each layer's weight-gradient FLOPs and the full backward FLOPs on ``inputs``
    (positional, and keyword inputs ``kwinputs`` for models such as Hugging Face's).

    One forward (attributed per layer) and one forward+backward under ``FlopCounterMode``, in
    train mode with nothing dropped. The model is left as it was (:func:`ldbfx.runtime.measure.measuring`:
    buffers, random generators, drops, the record of skipped layers); gradients are cleared.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]))
        >>> report = ldbfx.inspect.weight_grad_flops(gm, torch.randn(4, 8))
        >>> report.weight_grad[4], report.backward
        (512, 5632)
    """
    layers = _layers(gm)
    saving = {l.index for l in layers if l.saves_compute}
    with measuring(gm, nothing_dropped=True):
        counter = _LayerFlops(len(layers))
        # With grad enabled, so MHA takes its projection path rather than the fused inference op.
        with counter:
            _Attributing(gm, counter).run(*_graph_inputs(gm, inputs, kwinputs))
        backward = _backward_flops(gm, inputs, kwinputs)
    per_layer = tuple(f if i in saving else 0 for i, f in enumerate(counter.flops))
    return FlopReport(per_layer, backward)


@dataclass(frozen=True)
class BranchFlopReport:
    """Backward FLOPs that dropping each residual branch alone saves.

    Attributes:
        saved: per branch (indexed like ``ldbfx.branches(gm)``), the backward FLOPs dropping it
            alone skips (its dX and dW); 0 for branches that are not eligible.
        backward: FLOPs of one full backward pass (nothing dropped).
    """

    saved: tuple[int, ...]
    backward: int

    def share(self, indices) -> float:
        """Fraction of the backward FLOPs that dropping the branches ``indices`` skips. Branches
        found by the rule in ResNets and transformers do not nest, so their savings add up; for
        nested branches (``extra_branches``) an inner one inside a dropped outer one counts twice."""
        return sum(self.saved[i] for i in indices) / self.backward if self.backward else 0.0


def branch_flops(gm: LdbGraphModule, *inputs: Any, **kwinputs: Any) -> BranchFlopReport:
    """Measures, per eligible residual branch, the backward FLOPs that dropping it alone saves.

    One forward+backward under ``FlopCounterMode`` with nothing dropped (no branch, no layer, no
    frozen rows), then one per eligible branch, in train mode with the same random numbers each.
    The model is left as it was: buffers, random generators, dropped branches and layers, frozen
    rows, whether a compile splits at branches, the record of skipped layers
    (:func:`ldbfx.runtime.measure.measuring`); gradients are cleared.

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(6)]))
        >>> report = ldbfx.inspect.branch_flops(gm, torch.randn(2, 8))
        >>> report.saved, report.backward
        ((0, 512, 512, 512, 512, 0), 2816)
        >>> round(report.share([1, 2]), 3)
        0.364
    """
    def count(probe: Probe, drop: tuple[int, ...]) -> int:
        set_dropped_branches(gm, drop)
        probe.reseed()  # the same random numbers for every count (dropout)
        return _backward_flops(gm, inputs, kwinputs)

    with measuring(gm, nothing_dropped=True) as probe:
        full = count(probe, ())
        saved = tuple(full - count(probe, (b.index,)) if b.eligible else 0 for b in branches(gm))
    return BranchFlopReport(saved, full)


def _backward_flops(gm: LdbGraphModule, inputs: tuple, kwinputs: dict) -> int:
    """FLOPs of one backward of ``gm`` on the inputs (of the sum of its floating-point outputs);
    the gradients it leaves are cleared."""
    out = gm(*inputs, **kwinputs)
    loss = sum(t.float().sum() for t in _tensors(out) if t.is_floating_point() and t.requires_grad)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    gm.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def summary(gm: LdbGraphModule, *example_inputs: Any, print_fn=print, **example_kwargs: Any) -> str:
    """Prints (and returns) the layer table of a transformed model.

    Columns: index, name, type, kind, parameter count, eligibility (or why not), and, when
    example inputs are given, each layer's share of the backward FLOPs that dropping it skips.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        *example_inputs: optional inputs for the FLOP column (small ones are fine).
        print_fn: where the table goes. Default: ``print``.
        **example_kwargs: optional keyword inputs for the FLOP column (``input_ids=...``).

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]))
        >>> _ = ldbfx.summary(gm, torch.randn(4, 8), print_fn=lambda s: None)
    """
    layers = _layers(gm)
    given = example_inputs or example_kwargs
    report = weight_grad_flops(gm, *example_inputs, **example_kwargs) if given else None
    header = ["#", "name", "type", "kind", "params", "eligible"] + (["dW share"] if report else [])
    rows = []
    for l in layers:
        row = [str(l.index), l.name, l.type, l.kind, f"{l.numel:,}", "yes" if l.eligible else f"no ({l.reason})"]
        if report:
            row.append(f"{100 * report.share(l.index):.1f}%")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    eligible = [l for l in layers if l.eligible]
    footer = (f"{len(layers)} layers, {len(eligible)} eligible "
              f"({sum(l.numel for l in eligible):,} of {sum(l.numel for l in layers):,} parameters)")
    if report:
        share = sum(report.weight_grad[l.index] for l in eligible) / max(report.backward, 1)
        footer += f"; dropping every eligible layer skips {100 * share:.1f}% of the backward FLOPs"
    lines.append(footer)
    text = "\n".join(lines)
    print_fn(text)
    return text


def to_networkx(gm: LdbGraphModule) -> networkx.DiGraph:
    """The layer DAG: one node per layer (keyed by index), an edge where data flows between
    layers without crossing another layer.

    Node attributes: ``name``, ``type``, ``kind``, ``params``, ``numel``, ``eligible``, ``reason``.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)]), keep_first=1)
        >>> sorted(ldbfx.to_networkx(gm).edges)
        [(0, 1), (1, 2)]
    """
    try:
        import networkx as nx
    except ImportError as error:
        raise ImportError("ldbfx.to_networkx needs networkx: pip install 'ldbfx[graph]'") from error

    graph = nx.DiGraph()
    for l in _layers(gm):
        graph.add_node(l.index, name=l.name, type=l.type, kind=l.kind, params=l.params,
                       numel=l.numel, eligible=l.eligible, reason=l.reason)
    graph.add_edges_from(gm.ldbfx_edges)
    return graph
