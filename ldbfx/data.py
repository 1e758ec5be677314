"""Moved to :mod:`ldbfx.app.data` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import data as _moved

sys.modules[__name__] = _moved
