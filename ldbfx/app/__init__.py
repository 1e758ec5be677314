"""The application built on the library: the ``ldbfx`` command, its trainer, data and demos, and the
benchmark harnesses (``race``, ``bench``).

It needs the ``app`` extra (``pip install 'ldbfx[app]'``: torchvision, timm, scikit-learn,
matplotlib, tqdm, networkx); the library (``import ldbfx``) needs only torch. Nothing in the library imports
from here.
"""

#: The modules that lived at ``ldbfx.<name>`` before the application had its own folder; those
#: names still import them (each ``ldbfx/<name>.py`` aliases ``ldbfx.app.<name>``).
MOVED = ("bench", "cli", "data", "demo", "demo_lm", "race", "train", "workloads")
