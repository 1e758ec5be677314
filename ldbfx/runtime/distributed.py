"""ldbfx under ``torch.distributed``: DistributedDataParallel without unused-parameter errors.

DDP's reducer expects every parameter to receive a gradient in every backward. In eager mode a
dropped layer leaves ``.grad`` as ``None`` (that is how it saves the weight gradient), which the
reducer treats as an unused parameter: an "expected to have finished reduction" error on the next
step, or ``find_unused_parameters=True`` and its per-step graph traversal. In *dense mode*
dropped layers still skip their weight-gradient computation (and keep no activation for it), but
their parameters get zero gradients, so the reducer all-reduces every bucket as usual. After the
all-reduce, ldbfx's optimizer hook turns those zeros back into ``None``, so the optimizer leaves
them untouched on every rank.

A transformed model switches to dense mode by itself the first time it runs inside a DDP forward:
``DistributedDataParallel(ldbfx.transform(model))`` works as it is. :func:`dense_gradients` sets
the mode explicitly (an explicit choice is kept).

Masks must be the same on every rank. The policies draw them from their own seeded generator, so
the same ``seed`` on every rank gives identical masks without communication; :func:`check_masks`
verifies it (one all-gather of the mask, for debugging), and :func:`broadcast_seed` hands every
rank rank 0's seed once, for code that seeds each rank differently.

:func:`skip_dropped_allreduce` goes one step further for DDP: a communication hook that leaves the
dropped layers' (zero) gradients out of the all-reduce, so a step sends fewer bytes.

FSDP2 (``fully_shard``) needs neither: it reduce-scatters whole parameter groups, filling a dropped
layer's missing gradient with zeros, and ldbfx's optimizer hook finds the sharded parameters. The
weight-gradient FLOPs are saved there too; the communication is not (see ``docs/design.md``).

Example:
    >>> import torch, ldbfx
    >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
    >>> ldbfx.distributed.dense_gradients(gm)
    >>> ldbfx.set_dropped(gm, ["5"])
    >>> gm(torch.randn(2, 4)).sum().backward()
    >>> bool(gm.get_submodule("5").weight.grad.abs().sum() == 0)   # a zero, not None
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LdbfxError
from .mask import _check
from .module import LdbGraphModule

__all__ = ["dense_gradients", "check_masks", "broadcast_seed", "mean_over_ranks", "skip_dropped_allreduce",
           "AllReduceStats"]


def dense_gradients(gm, enabled: bool = True) -> None:
    """Dropped layers of ``gm`` yield zero gradients instead of none (for DDP); FLOPs are still saved.

    Not needed for DDP: a transformed model turns dense mode on the first time it runs inside a
    DistributedDataParallel forward. Call it to choose explicitly; the choice is then kept.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        enabled: ``False`` restores the default (``None`` gradients in eager mode), for good.
    """
    _check(gm).ldbfx_state.set_dense(enabled)


def _collective_device(group) -> torch.device:
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int | None = None, src: int = 0, group=None) -> int:
    """Rank ``src``'s ``seed`` on every rank (one broadcast); ``None`` lets ``src`` draw one.

    Use it once, before building a policy, when ranks were seeded differently (rank-local
    seeds): a policy seeded with the result draws the same layers on every rank.

    Example:
        >>> seed = ldbfx.distributed.broadcast_seed()              # doctest: +SKIP
        >>> policy = ldbfx.LayerDropBack(gm, opt, seed=seed)      # doctest: +SKIP
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    value = torch.tensor([seed], dtype=torch.int64, device=_collective_device(group))
    torch.distributed.broadcast(value, src=src, group=group)
    return int(value.item())


def mean_over_ranks(values: list[float], group=None) -> list[float]:
    """The mean of ``values`` over the ranks (one all-reduce; call it on every rank), or
    ``values`` as they are without a process group of more than one rank.

    Example:
        >>> import ldbfx
        >>> ldbfx.distributed.mean_over_ranks([1.0, 2.0])   # one process: unchanged
        [1.0, 2.0]
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(total, group=group)
    return (total / dist.get_world_size(group)).tolist()


def _mask_digest(state) -> torch.Tensor:
    """Everything a policy draws, as one int64 vector: the layer mask, the branch mask
    (DropBP) and a digest of the row selections (ChannelDropBack; hashes of int tuples are
    the same in every process)."""
    rows = hash(tuple(sorted((index, sel.dim, tuple(sel.frozen.tolist())) for index, sel in state.rows.items())))
    return torch.cat([state.mask.long(), state.branch_mask.long(), torch.tensor([rows])])


def check_masks(gm, group=None) -> None:
    """Raises :class:`LdbfxError` if what the policy drew differs between ranks (one all-gather):
    the dropped layers, the dropped branches (DropBP) or the frozen rows (ChannelDropBack).

    Call it in debug runs after the policy's draw; a divergent mask means the ranks were not given
    the same policy ``seed`` (their weights would silently drift apart).
    """
    state = _check(gm).ldbfx_state
    local = _mask_digest(state).to(_collective_device(group))
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, local, group=group)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        n, b = len(state.mask), len(state.branch_mask)
        parts = {"dropped layers": slice(0, n), "dropped branches": slice(n, n + b), "frozen rows": slice(n + b, None)}
        what = [name for name, part in parts.items()
                if any(not torch.equal(other[part], gathered[0][part]) for other in gathered)]
        raise LdbfxError(
            f"ldbfx masks differ between ranks (rank 0 vs ranks {differing}: {', '.join(what)}): give "
            "every rank's policy the same seed, or broadcast the mask from rank 0")


@dataclass
class AllReduceStats:
    """Gradient bytes the :func:`skip_dropped_allreduce` hook all-reduced and left out, summed
    over the buckets it has seen (``steps`` counts backward passes)."""

    bytes_reduced: int = 0
    bytes_skipped: int = 0
    steps: int = 0


class _SkipDropped:
    """The hook's state: the mask, a layer index per parameter, and a layout per bucket."""

    def __init__(self, gm, group):
        self.mask = gm.ldbfx_state.mask
        self.group = group if group is not None else torch.distributed.group.WORLD
        self.stats = AllReduceStats()
        self._layer_of = {id(p): i for i in range(len(gm.ldbfx_layers)) for p in gm.ldbfx_state.params(i)}
        self._layouts: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}

    def layout(self, bucket) -> tuple[torch.Tensor, ...]:
        """``(layer index, in a layer, numel, start, stop)`` per parameter of ``bucket``, in buffer
        order (parameters in no layer, which are never dropped, get index 0 and ``False``).

        DDP packs a bucket's gradients back to back in parameter order. It rebuilds its buckets
        once, after the first step; layouts are keyed by the bucket's parameters, so a rebuilt
        bucket gets its own.
        """
        params = bucket.parameters()
        key = tuple(map(id, params))
        layout = self._layouts.get(key)
        if layout is None:
            layers = torch.tensor([self._layer_of.get(id(p), -1) for p in params])
            sizes = torch.tensor([p.numel() for p in params])
            stops = sizes.cumsum(0)
            layout = self._layouts[key] = (layers.clamp(min=0), layers >= 0, sizes, stops - sizes, stops)
        return layout


def _skip_dropped_hook(state, bucket):  # no annotations: DDP compares them as objects, not strings
    buffer = bucket.buffer()
    layers, in_layer, sizes, starts, stops = state.layout(bucket)
    dropped = state.mask[layers] & in_layer
    stats = state.stats
    if bucket.is_last():
        stats.steps += 1
    if not bool(dropped.any()):
        return _allreduce(state, buffer, buffer)
    skipped = int(sizes[dropped].sum()) * buffer.element_size()
    stats.bytes_skipped += skipped
    if bool(dropped.all()):
        # Every rank drops the same layers (identical masks), so every rank skips this bucket.
        # Dropped gradients are zeros on every rank: the buffer already holds their mean.
        future = torch.futures.Future()
        future.set_result(buffer)
        return future
    # The kept gradients as runs of adjacent parameters: views of the buffer, sent in one
    # collective (packed when there are several runs, in place when there is one).
    kept = (~dropped).to(torch.int8)
    edges = torch.diff(kept, prepend=kept.new_zeros(1), append=kept.new_zeros(1))
    first, last = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten() - 1
    runs = [buffer[a:b] for a, b in zip(starts[first].tolist(), stops[last].tolist())]
    if len(runs) == 1:
        return _allreduce(state, runs[0], buffer)
    return _allreduce(state, torch.cat(runs), buffer, runs)


def _allreduce(state: _SkipDropped, tensor, buffer, runs=None):
    """All-reduces ``tensor`` (the buffer, a view of it, or its ``runs`` packed); the future
    yields the buffer holding the mean."""
    state.stats.bytes_reduced += tensor.numel() * tensor.element_size()
    tensor.div_(state.group.size())  # before the sum, as DDP's own hook does (no fp16 overflow)
    work = torch.distributed.all_reduce(tensor, group=state.group, async_op=True)

    def done(future):
        if runs is not None:
            for run, reduced in zip(runs, future.value()[0].split([r.numel() for r in runs])):
                run.copy_(reduced)
        return buffer

    return work.get_future().then(done)


def skip_dropped_allreduce(ddp, group=None) -> AllReduceStats:
    """Registers a DDP communication hook that does not all-reduce dropped layers' gradients.

    A bucket whose layers are all dropped sends nothing; a mixed bucket sends its kept
    gradients only. Masks must be equal on every rank (the policies' shared ``seed`` makes them
    so; :func:`check_masks` verifies), or ranks would wait for different collectives.
    Whole-layer drops only: ChannelDropBack's frozen rows are still sent.

    Args:
        ddp: a ``DistributedDataParallel`` around a module from :func:`ldbfx.transform`, in
            :func:`dense_gradients` mode (DDP needs every gradient to be ready, even when unsent).
        group: the process group DDP reduces over (default: the world).

    Returns:
        The running byte counts, updated by every backward.

    Raises:
        LdbfxError: ``ddp`` does not wrap a transformed module in dense-gradient mode.

    Example:
        >>> ldbfx.distributed.dense_gradients(gm)                          # doctest: +SKIP
        >>> ddp = torch.nn.parallel.DistributedDataParallel(gm)           # doctest: +SKIP
        >>> stats = ldbfx.distributed.skip_dropped_allreduce(ddp)         # doctest: +SKIP
    """
    gm = ddp.module
    if not isinstance(gm, LdbGraphModule):
        raise LdbfxError(
            f"skip_dropped_allreduce needs DDP around a module from ldbfx.transform, got "
            f"{type(gm).__name__}: wrap gm = ldbfx.transform(model) as DistributedDataParallel(gm)")
    ldb = gm.ldbfx_state
    if ldb.dense_auto:
        ldb.set_dense(True)  # what the first forward under DDP would do
    if not ldb.dense:
        raise LdbfxError(
            "skip_dropped_allreduce needs dense gradients (DDP waits for every gradient), but they "
            "were turned off with dense_gradients(gm, enabled=False): turn them back on")
    state = _SkipDropped(gm, group)
    ddp.register_comm_hook(state, _skip_dropped_hook)
    return state.stats
