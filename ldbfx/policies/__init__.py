"""Training policies: which layers (or channels) skip their update at which step."""

from .cdb import ChannelDropBack, channel_rate_at
from .dropbp import DropBP, allocate_rates
from .ldb import LayerDropBack, draw_dropped, is_drop_epoch
from .learn_drop import LearnAndDrop

__all__ = ["LayerDropBack", "ChannelDropBack", "LearnAndDrop", "DropBP", "allocate_rates", "draw_dropped", "is_drop_epoch", "channel_rate_at"]
