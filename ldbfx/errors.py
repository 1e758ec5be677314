"""Exceptions and warnings raised by ldbfx.

Every error names what went wrong *and* how to fix it; when a name the user asked for does not
exist, the message lists the names that do.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LdbfxError", "TraceError", "LayerNotFoundError", "BranchNotFoundError", "NoEligibleLayerWarning"]


class LdbfxError(Exception):
    """Base class of every error raised by ldbfx."""


class TraceError(LdbfxError):
    """The model could not be captured (traced by ``torch.fx`` or exported by ``torch.export``).

    The message names the module or node that failed, the original cause (kept as ``__cause__``)
    and the usual fixes: declare the module a leaf, pass ``concrete_args``, or capture with
    ``torch.export`` from an example batch (``example_args=`` / ``example_kwargs=``).
    """


class _NotFound(LdbfxError, KeyError):
    """A name or index the user gave does not exist: the message, printed as it is."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class LayerNotFoundError(_NotFound):
    """A layer name or index does not exist, or names a layer that may not be dropped."""

    @classmethod
    def unknown(cls, requested: object, valid: Sequence[str]) -> LayerNotFoundError:
        listing = ", ".join(valid) if valid else "(none: no layer is eligible)"
        return cls(f"no eligible layer named {requested!r}. Eligible layers are: {listing}")


class BranchNotFoundError(_NotFound):
    """A branch name or index does not exist, or names a branch that may not be dropped."""


class NoEligibleLayerWarning(UserWarning):
    """``transform`` found no layer that may be dropped; the model trains exactly as before."""
