"""Learn&Drop as a policy: score how much each layer still learns, freeze a growing prefix.

The rules (../shared/METHODS.md §3, Learn&Drop paper):

* **Score (eq. 2).** Over an epoch, per weight ``i`` of layer ``l`` and step ``j``:
  ``P_l = 1 - sum_i |sum_j g_lij| / sum_i sum_j |g_lij|`` (two accumulators per weight). ``P -> 1``:
  the gradients cancel, the layer has stopped learning; ``P -> 0``: it still learns.
* **Standardize (eq. 3)** over the trainable head's scored layers: ``P' = (P - mean) / std``
  (population std; all-equal scores give no sign change).
* **Drop rule (eq. 4).** ``n* = min{t : P'_t > 0 and P'_{t+1} < 0}``; the head's layers up to ``n*``
  are the candidates (at least one; none when there is no such ``t``, so the last scored layer
  never drops). **Guard:** they drop only if the median of their ``P'`` exceeds the median of the
  ``P'`` stored for layers dropped earlier (no guard for the first drop).
* **When.** At the end of every epoch after the ``warmup_epochs`` warm-up epochs (with 2, the first
  decision ends epoch 2, the third).

Which layers are scored: trainable linear and convolution layers (the paper scores convolutions;
ldbfx also scores linears so transformers work). The layers the paper does not score (norms,
biases, class tokens, position embeddings) follow the scored layer before them (those before the
first scored layer follow the first), so a BatchNorm freezes with its convolution.

What a drop does: the scored layers and their followers form a frozen *prefix* of the graph. Their
parameters stop requiring gradients, so autograd records nothing there: no weight gradient and no
input gradient below the head (the backward stops at the cut; :func:`ldbfx.inspect` FLOPs show it),
and the optimizer skips them. Modules of the prefix are pinned in eval mode: frozen BatchNorm layers
normalise with their running statistics and stop updating them (also after ``gm.train()``). Under
``torch.compile`` each drop changes ``requires_grad`` once, which costs one recompile per drop event
(at most one per epoch), never one per step. Layers are never reinstated.

Feature cache (``cache="memory"`` or ``"disk"``): :meth:`LearnAndDrop.forward` runs the prefix
once per sample, stores every tensor that crosses the cut (skip connections included), and from
then on trains the head from the stored tensors, skipping the prefix forward too. It is valid only
when each sample's input is the same every epoch; a per-sample checksum of the input catches random
augmentation and raises, unless ``allow_random_inputs=True``. Evaluation always runs the full model.

Switch modes with ``gm.train()`` / ``gm.eval()`` (the transformed module keeps the prefix pinned in
eval mode); ``model.train()`` on the original module object would unpin it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ..errors import LdbfxError
from ..analysis.layers import layers as _layers
from ..runtime.mask import refuse_sharded, row_layers
from ..runtime.module import MASK_ATTR
from .ldb import check_saved_settings

__all__ = ["LearnAndDrop", "layer_change_scores", "standardize", "drop_count"]


def layer_change_scores(grad_sums: Sequence[torch.Tensor], abs_sums: Sequence[torch.Tensor]) -> list[float]:
    """Eq. 2 per layer from its accumulators ``sum_j g`` and ``sum_j |g|``."""
    scores = []
    for total, absolute in zip(grad_sums, abs_sums):
        denominator = float(absolute.double().sum())
        scores.append(1.0 - float(total.double().abs().sum()) / denominator if denominator > 0 else 0.0)
    return scores


def standardize(scores: Sequence[float]) -> list[float]:
    """Eq. 3: zero mean, unit (population) standard deviation; all zeros when they are all equal."""
    if len(scores) < 2:
        return [0.0] * len(scores)
    mean, std = statistics.fmean(scores), statistics.pstdev(scores)
    return [(s - mean) / std if std > 0 else 0.0 for s in scores]


def drop_count(standardized: Sequence[float], stored: Sequence[float] = ()) -> int:
    """Eq. 4 and the guard: how many of the head's first scored layers drop now (0 = none).

    Example:
        >>> drop_count([0.9, 0.4, -0.5, 0.3, -1.1])   # first + -> - change after index 1
        2
        >>> drop_count([-1.0, 0.5, 0.5])               # no + -> - change: nothing drops
        0
        >>> drop_count([0.9, -0.9], stored=[1.2])      # candidates' median 0.9 <= 1.2: guarded
        0
    """
    for t in range(len(standardized) - 1):
        if standardized[t] > 0 and standardized[t + 1] < 0:
            count = t + 1
            if stored and statistics.median(standardized[:count]) <= statistics.median(stored):
                return 0
            return count
    return 0


def _layer_of(node: fx.Node) -> int:
    """The layer a rewritten node belongs to (-1 for none): its ``(mask, index)`` arguments."""
    if "ldbfx" in node.meta:
        return node.meta["ldbfx"]["layer"]
    for arg, following in zip(node.args, node.args[1:]):
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target == MASK_ATTR:
            return following
    return -1


def _pruned(module: fx.GraphModule) -> fx.GraphModule:
    module.graph.eliminate_dead_code()  # attribute reads only the other half used
    module.recompile()
    return module


class LearnAndDrop:
    """The Learn&Drop policy for a model transformed by :func:`ldbfx.transform`.

    Args:
        gm: the transformed model.
        optimizer: its optimizer; a step pre-hook accumulates the scores' gradient sums. ``None``:
            call :meth:`accumulate` after each backward yourself.
        warmup_epochs: epochs trained fully before the first possible drop (the paper: MNIST 5,
            CIFAR-10 10, Imagenette 25).
        cache: ``None`` (no cache), ``"memory"`` (CPU tensors) or ``"disk"`` (memory-mapped files
            in ``cache_dir``, a temporary directory by default).
        num_samples: number of training samples (indices ``0..num_samples-1``); needed by the cache.
        cache_dir: directory of the disk cache.
        allow_random_inputs: cache even when a sample's input changes between epochs (it then
            trains on the first input seen). Default: ``False`` (raise).
        compile_head: run the head under ``torch.compile`` when the cache is used.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]))
        >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        >>> policy = ldbfx.LearnAndDrop(gm, opt, warmup_epochs=1)
        >>> for epoch in range(3):
        ...     policy.start_epoch(epoch)
        ...     for step in range(4):
        ...         gm(torch.randn(4, 8)).sum().backward()
        ...         opt.step(); opt.zero_grad()
        ...     policy.end_epoch()
        >>> len(policy.history)
        2
    """

    def __init__(self, gm, optimizer: torch.optim.Optimizer | None = None, *, warmup_epochs: int,
                 cache: str | None = None, num_samples: int | None = None, cache_dir: str | None = None,
                 allow_random_inputs: bool = False, compile_head: bool = False):
        if not (isinstance(warmup_epochs, int) and warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if cache not in (None, "memory", "disk"):
            raise ValueError(f"cache must be None, 'memory' or 'disk', got {cache!r}")
        if cache is not None and not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError("the feature cache stores one entry per training sample: pass num_samples=len(dataset)")
        if gm.ldbfx_state.blocks:
            raise LdbfxError("Learn&Drop splits the whole graph into a frozen prefix and a head, which a per-block "
                             "install does not run: install the whole graph (ldbfx.install(model, gm))")
        all_layers = _layers(gm)
        scored = [l.index for l in row_layers(gm)]
        if len(scored) < 2:
            raise ValueError(f"Learn&Drop needs at least 2 trainable linear/conv layers, found {len(scored)}")
        self.gm, self.optimizer, self.warmup_epochs = gm, optimizer, warmup_epochs
        self.cache, self.num_samples, self.allow_random_inputs = cache, num_samples, allow_random_inputs
        self.compile_head = compile_head
        self._cache_dir = cache_dir
        self._layers = all_layers
        self._scored = tuple(scored)
        # Unit k = scored layer k and the unscored layers up to the next scored one.
        starts = [0] + list(scored[1:])
        self._unit_start = tuple(starts)
        self._weights = self._current_weights()
        self.frozen_units = 0  # the head starts at scored layer ``frozen_units``
        self._stored: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.epoch: int | None = None
        self._reset_accumulators()
        self._hooks = [optimizer.register_step_pre_hook(lambda *a: self.accumulate())] if optimizer else []
        self._head = self._prefix = None
        self._store: dict[str, Any] | None = None

    # -- scores -----------------------------------------------------------------------------------
    def _current_weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(max(self.gm.ldbfx_state.params(i), key=lambda p: p.dim()) for i in self._scored)

    def _reset_accumulators(self) -> None:
        head = self._weights[self.frozen_units:]
        self._sum = [torch.zeros_like(w, dtype=torch.float32) for w in head]
        self._abs = [torch.zeros_like(w, dtype=torch.float32) for w in head]

    def accumulate(self) -> None:
        """Adds the current gradients of the head's scored layers to the epoch's sums."""
        pairs = [(s, a, w.grad) for s, a, w in zip(self._sum, self._abs, self._weights[self.frozen_units:])
                 if w.grad is not None]
        if pairs:
            sums, absolutes, grads = zip(*pairs)
            grads = [g.float() for g in grads]
            torch._foreach_add_(list(sums), grads)
            torch._foreach_add_(list(absolutes), torch._foreach_abs(grads))

    def scores(self) -> list[float]:
        """Eq. 2 for the head's scored layers, from the current epoch's sums."""
        return layer_change_scores(self._sum, self._abs)

    # -- schedule ---------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Starts an epoch: fresh score accumulators."""
        for param in self._weights:
            refuse_sharded(param, "Learn&Drop")
        if any(w is not current for w, current in zip(self._weights, self._current_weights())):
            raise LdbfxError("the model's parameters were replaced after LearnAndDrop was built (a "
                             "wrapper such as fully_shard?): build the policy on the final model")
        self.epoch = epoch
        self._reset_accumulators()

    def step(self) -> None:
        """Nothing per step (scores accumulate in the optimizer hook); kept for a common interface."""

    def end_epoch(self) -> None:
        """After the warm-up: scores the head, applies the drop rule and its guard."""
        if self.epoch is None:
            raise RuntimeError("call policy.start_epoch(epoch) before policy.end_epoch()")
        if self.epoch < self.warmup_epochs:  # epochs 0 .. warmup_epochs - 1 are the warm-up
            return
        raw = self.scores()
        standardized = standardize(raw)
        count = drop_count(standardized, self._stored)
        head_names = [self._layers[i].name for i in self._scored[self.frozen_units:]]
        self.history.append({"epoch": self.epoch, "head": head_names, "scores": raw,
                             "standardized": standardized, "dropped": head_names[:count]})
        if count:
            self._stored.extend(standardized[:count])
            self.freeze_units(self.frozen_units + count)

    def batch_size(self, base: int) -> int:
        """Learn&Drop keeps the batch size (the trainer's common interface)."""
        return base

    # -- the frozen prefix ------------------------------------------------------------------------
    @property
    def cut_layer(self) -> int:
        """Index (as in ``ldbfx.layers``) of the first layer of the trainable head."""
        return self._unit_start[self.frozen_units]

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        """Names of the layers in the frozen prefix."""
        return tuple(l.name for l in self._layers[: self.cut_layer])

    def freeze_units(self, units: int) -> None:
        """Freezes the first ``units`` scored layers and their followers (what a drop does).

        The drop rule calls it; call it yourself to reproduce the paper's "freezing" baseline or to
        resume a known split. Layers are never reinstated: ``units`` must not decrease.

        Raises:
            ValueError: ``units`` is below the current split or leaves no scored layer trainable.
        """
        if not self.frozen_units <= units < len(self._scored):
            raise ValueError(f"units must be in [{self.frozen_units}, {len(self._scored) - 1}] "
                             f"(frozen layers are never reinstated; the last scored layer always trains), got {units}")
        self.frozen_units = units
        for layer in self._layers[: self.cut_layer]:
            for param in self.gm.ldbfx_state.params(layer.index):
                param.requires_grad_(False)
                param.grad = None
        self.gm.ldbfx_state.pinned_eval = tuple(self._prefix_modules())
        self.gm.train(self.gm.training)  # applies the pinning now
        self._head = self._prefix = self._store = None  # the cut moved: a new split and cache

    def _prefix_modules(self):
        names = set()
        for layer in self._layers[: self.cut_layer]:
            names.update(p.rpartition(".")[0] for p in layer.params)
        for node in self._split()[0]:
            if node.op == "call_module":
                names.add(node.target)
        return [self.gm.get_submodule(n) for n in sorted(names) if n]

    def _split(self) -> tuple[list[fx.Node], list[fx.Node]]:
        """Nodes of the train graph before the cut (graph order) and after it."""
        nodes = list(self.gm.graph.nodes)
        cut = next(i for i, n in enumerate(nodes) if n.op != "get_attr" and _layer_of(n) >= self.cut_layer)
        return nodes[:cut], nodes[cut:]

    def _build_split_modules(self) -> None:
        prefix, head = self._split()
        in_prefix = {n for n in prefix if n.op != "get_attr"}
        crossing = [n for n in prefix if n in in_prefix and any(u not in in_prefix and u.op != "get_attr"
                                                                 for u in n.users)]
        prefix_graph, env = fx.Graph(), {}
        for node in prefix:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
        prefix_graph.output(tuple(env[n] for n in crossing))
        head_graph, env = fx.Graph(), {}
        for node in crossing:
            env[node] = head_graph.placeholder(node.name)
        for node in prefix:  # attribute reads the head needs (parameters, modules, the mask)
            if node.op == "get_attr" and any(u not in in_prefix for u in node.users):
                env[node] = head_graph.node_copy(node)
        for node in head:
            env[node] = head_graph.node_copy(node, lambda n: env[n])
        self._crossing = [n.name for n in crossing]
        self._prefix = _pruned(fx.GraphModule(self.gm, prefix_graph))
        head_module = _pruned(fx.GraphModule(self.gm, head_graph))
        self._head = torch.compile(head_module) if self.compile_head else head_module

    # -- the feature cache --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None):
        """The training forward: ``gm(x)``, or the head on cached prefix outputs.

        Args:
            x: the batch.
            indices: dataset indices of its samples (``0..num_samples-1``); needed with a cache.
        """
        if self.cache is None or self.frozen_units == 0 or not self.gm.training or not torch.is_grad_enabled():
            return self.gm(x)
        if indices is None:
            raise ValueError("with a feature cache, pass each batch's dataset indices: policy.forward(x, indices)")
        if self._head is None:
            self._build_split_modules()
        indices = indices.cpu().long()
        digest = self._digest(x).cpu()
        if self._store is not None and bool(self._store["filled"][indices].all()):
            if not self.allow_random_inputs and not torch.allclose(self._store["digest"][indices], digest, rtol=1e-4, atol=1e-4):
                raise LdbfxError(
                    "Learn&Drop feature cache: a sample's input changed between epochs (random data "
                    "augmentation?). Cached features would freeze one augmentation sample. Use cache=None, "
                    "a deterministic pipeline, or allow_random_inputs=True to accept it.")
            cut = [t[indices].to(x.device, non_blocking=True) for t in self._store["tensors"]]
            return self._head(*cut)
        with torch.no_grad():
            cut = self._prefix(x)
        self._save(cut, indices, digest)
        return self._head(*cut)

    def _digest(self, x: torch.Tensor) -> torch.Tensor:
        # A fixed random projection of each sample: equal inputs give equal digests, a random crop
        # or flip almost surely does not.
        flat = x.detach().flatten(1).double()
        weights = torch.rand(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return flat @ weights.to(flat.device)

    def _save(self, cut, indices, digest) -> None:
        batch = len(indices)
        for name, value in zip(self._crossing, cut):
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
                raise LdbfxError(
                    f"Learn&Drop feature cache: the value {name!r} crossing the cut is not a per-sample "
                    f"tensor ({type(value).__name__}{'' if not isinstance(value, torch.Tensor) else tuple(value.shape)}); "
                    "this model cannot use the cache. Use cache=None.")
        if self._store is None:
            tensors = []
            for i, value in enumerate(cut):
                shape = (self.num_samples, *value.shape[1:])
                if self.cache == "disk":
                    directory = self._cache_dir or tempfile.mkdtemp(prefix="ldbfx-cache-")
                    os.makedirs(directory, exist_ok=True)
                    path = os.path.join(directory, f"cut{self.frozen_units}_{i}.bin")
                    numel = int(torch.Size(shape).numel())
                    tensors.append(torch.from_file(path, shared=True, size=numel, dtype=value.dtype).view(shape))
                else:
                    tensors.append(torch.empty(shape, dtype=value.dtype))
            self._store = {"tensors": tensors, "filled": torch.zeros(self.num_samples, dtype=torch.bool),
                           "digest": torch.zeros(self.num_samples, dtype=torch.float64)}
        for storage, value in zip(self._store["tensors"], cut):
            storage[indices] = value.detach().cpu()
        self._store["filled"][indices] = True
        self._store["digest"][indices] = digest

    # -- resumable state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the cache is rebuilt, not saved)."""
        return {"epoch": self.epoch, "frozen_units": self.frozen_units, "stored": list(self._stored),
                "history": list(self.history), "sum": [t.clone() for t in self._sum],
                "abs": [t.clone() for t in self._abs], "warmup_epochs": self.warmup_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_saved_settings("LearnAndDrop", state, {"warmup_epochs": self.warmup_epochs})
        self.epoch = state["epoch"]
        self._stored, self.history = list(state["stored"]), list(state["history"])
        if state["frozen_units"]:
            self.freeze_units(state["frozen_units"])
        self._sum = [t.clone() for t in state["sum"]]
        self._abs = [t.clone() for t in state["abs"]]

    def remove(self) -> None:
        """Removes the optimizer hook (frozen layers stay frozen, as in the method)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
