"""Moved to :mod:`ldbfx.app.bench` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import bench as _moved

sys.modules[__name__] = _moved
