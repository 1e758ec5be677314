"""Moved to :mod:`ldbfx.app.train` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import train as _moved

sys.modules[__name__] = _moved
