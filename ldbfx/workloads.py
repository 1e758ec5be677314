"""Moved to :mod:`ldbfx.app.workloads` (the application, ``pip install 'ldbfx[app]'``); this name keeps old imports working."""

import sys

from .app import workloads as _moved

sys.modules[__name__] = _moved
