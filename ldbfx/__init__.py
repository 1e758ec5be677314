"""ldbfx: skip chosen layers' weight gradients with a torch.fx pass, eager or compiled.

Example:
    >>> import torch, ldbfx
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(8)])
    >>> gm = ldbfx.transform(model)            # trace once, rewrite once
    >>> ldbfx.set_dropped(gm, ["4", "5"])      # flip a run-time mask every step
    >>> gm(torch.randn(2, 8)).sum().backward()
"""

from . import moved
from .analysis.branches import Branch, BranchNotFoundError, branches, dropped_branches, set_dropped_branches
from .analysis.layers import Layer, layers
from .errors import LayerNotFoundError, LdbfxError, NoEligibleLayerWarning, TraceError
from .integrations.inspection import summary, to_networkx
from .integrations.install import install, installed, uninstall
from .policies import ChannelDropBack, DropBP, LayerDropBack, LearnAndDrop
from .rewrite.driver import TransformConfig, transform
from .runtime import distributed
from .runtime.mask import discard_skipped, dropped, frozen_rows, set_dropped, set_frozen_rows
from .runtime.module import LdbGraphModule

# The old module paths (ldbfx.mask, ldbfx.inspect, ldbfx.train, ...) name the moved modules.
moved.register(__import__(__name__))

__version__ = "0.1.0"

__all__ = [
    "transform",
    "install",
    "uninstall",
    "installed",
    "layers",
    "set_dropped",
    "dropped",
    "discard_skipped",
    "set_frozen_rows",
    "frozen_rows",
    "branches",
    "set_dropped_branches",
    "dropped_branches",
    "Branch",
    "BranchNotFoundError",
    "summary",
    "to_networkx",
    "LayerDropBack",
    "ChannelDropBack",
    "LearnAndDrop",
    "DropBP",
    "Layer",
    "LdbGraphModule",
    "TransformConfig",
    "LdbfxError",
    "TraceError",
    "LayerNotFoundError",
    "NoEligibleLayerWarning",
]
