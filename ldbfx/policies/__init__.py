"""Training policies: which layers drop at which step (pure schedules behind thin classes)."""

from .ldb import LayerDropBack, draw_dropped, is_drop_epoch

__all__ = ["LayerDropBack", "draw_dropped", "is_drop_epoch"]
