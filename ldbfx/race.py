"""Moved to :mod:`ldbfx.app.race` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import race as _moved

sys.modules[__name__] = _moved
