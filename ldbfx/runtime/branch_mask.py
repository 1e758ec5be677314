"""The run-time API of branch drop on a transformed model: its residual branches, and which of them
the next backward drops (the rule that finds them is :mod:`ldbfx.analysis.branches`').
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import BranchNotFoundError
from .mask import _check, _ensure_skip_hook
from ..records import Branch

if TYPE_CHECKING:
    from .module import LdbGraphModule

__all__ = ["branches", "set_dropped_branches", "dropped_branches"]



def branches(gm: LdbGraphModule) -> tuple[Branch, ...]:
    """The residual branches of a transformed model, in topological order of their adds.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.

    Returns:
        A tuple of :class:`Branch` records; ``branches(gm)[i].index == i``. Empty for a model
        without residual adds.

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(4)]))
        >>> [(b.name, b.layers, b.eligible) for b in ldbfx.branches(gm)]
        [('0', ('0.norm', '0.fc'), False), ('1', ('1.norm', '1.fc'), True), ('2', ('2.norm', '2.fc'), True), ('3', ('3.norm', '3.fc'), False)]
    """
    return _check(gm).ldbfx_branches


def _branch_index(gm: LdbGraphModule, branch: str | int | Branch) -> int:
    records = gm.ldbfx_branches
    if isinstance(branch, Branch):
        branch = branch.index
    if isinstance(branch, str):
        index = gm.ldbfx_capture.branch_index.get(branch)
    elif isinstance(branch, int) and not isinstance(branch, bool):
        index = branch % len(records) if -len(records) <= branch < len(records) else None
    else:
        raise TypeError(f"branches are named by str or int index, got {type(branch).__name__}: {branch!r}")
    if index is not None and records[index].eligible:
        return index
    eligible = [b.name for b in records if b.eligible]  # for the error message only
    if index is None:
        if not records:
            raise BranchNotFoundError(
                f"no branch named {branch!r}: this model has no residual add ldbfx recognises "
                "(x + f(x)); see ldbfx.branches(gm) and the rule in ldbfx.branches' documentation")
        raise BranchNotFoundError(f"no branch named {branch!r}. Eligible branches are: "
                                  f"{', '.join(eligible) or '(none)'}")
    raise BranchNotFoundError(
        f"branch {records[index].name!r} (index {index}) may not be dropped "
        f"({records[index].reason}). Eligible branches are: {', '.join(eligible) or '(none)'}")


def set_dropped_branches(gm: LdbGraphModule, branches: Iterable[str | int | Branch]) -> None:
    """Detaches the output of ``branches`` in the backward from the next forward on.

    Nothing in a dropped branch is backpropagated (no dX, no dW); the skip path still carries the
    gradient. Its layers' parameters get no gradient and ``optimizer.step()`` leaves them and their
    optimizer state unchanged. Combines freely with :func:`ldbfx.set_dropped`. No retrace; under
    ``torch.compile`` the first non-empty call makes the model recompile once into regions split
    before each eligible branch's add, after which any branch mask runs without recompiling.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        branches: names, indices or :class:`Branch` records of eligible branches; ``[]`` restores
            full backprop.

    Raises:
        BranchNotFoundError: a branch does not exist or is not eligible (the message lists the
            eligible ones).

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(4)]))
        >>> ldbfx.set_dropped_branches(gm, ["1", 2])
        >>> gm(torch.randn(2, 8)).sum().backward()
        >>> gm.get_submodule("1.fc").weight.grad is None, gm.get_submodule("0.fc").weight.grad is None
        (True, False)
    """
    gm = _check(gm)
    if isinstance(branches, (str, int, Branch)):
        branches = [branches]
    indices = tuple(sorted({_branch_index(gm, b) for b in branches}))
    gm.ldbfx_state.set_dropped_branches(indices)
    if indices:
        _ensure_skip_hook()


def dropped_branches(gm: LdbGraphModule) -> tuple[str, ...]:
    """Names of the branches currently dropped, in topological order.

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(4)]))
        >>> ldbfx.set_dropped_branches(gm, [2, "1"])
        >>> ldbfx.dropped_branches(gm)
        ('1', '2')
    """
    gm = _check(gm)
    return tuple(gm.ldbfx_branches[i].name for i in gm.ldbfx_state.dropped_branches)
