"""The application built on the library: the ``ldbfx`` command, its trainer, data and demos, and the
benchmark harnesses (``race``, ``bench``).

It needs the ``app`` extra (``pip install 'ldbfx[app]'``: torchvision, timm, scikit-learn,
matplotlib, tqdm, networkx); the library (``import ldbfx``) needs only torch. Nothing in the library imports
from here.
"""

