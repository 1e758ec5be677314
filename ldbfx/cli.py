"""Moved to :mod:`ldbfx.app.cli` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import cli as _moved

sys.modules[__name__] = _moved
