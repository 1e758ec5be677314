"""Moved to :mod:`ldbfx.app.demo_lm` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import demo_lm as _moved

sys.modules[__name__] = _moved
