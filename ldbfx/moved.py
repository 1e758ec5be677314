"""The old import paths of modules that moved when the package took its layered layout.

``import ldbfx.mask`` and ``from ldbfx.train import train`` still work: each old name is the new
module itself (the same object, so monkeypatching either patches both). The library's modules,
which ``import ldbfx`` loads anyway, are registered under their old names at once; the Hugging Face
callback and the application, which need optional dependencies, on first import.

Example:
    >>> import ldbfx, ldbfx.mask
    >>> ldbfx.mask is ldbfx.runtime.mask
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__all__ = ["CORE", "LAZY", "register"]

#: Old name -> new name, under ``ldbfx.``: loaded by ``import ldbfx``.
CORE = {
    "trace": "capture.trace", "export": "capture.export",
    "layers": "analysis.layers", "branches": "analysis.branches",
    "state": "runtime.state", "module": "runtime.module", "mask": "runtime.mask",
    "distributed": "runtime.distributed", "handlers": "rewrite.handlers",
    "install": "integrations.install", "inspect": "integrations.inspection",
}
#: Old name -> new name, under ``ldbfx.``: loaded on first import (optional dependencies).
LAZY = {"hf": "integrations.hf", **{name: f"app.{name}" for name in (
    "bench", "cli", "data", "demo", "demo_lm", "race", "train", "workloads")}}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``ldbfx.<old>`` for the :data:`LAZY` names and gives the new module itself."""

    def __init__(self):
        self._own_specs: dict[int, object] = {}  # by module id: loads may nest

    def find_spec(self, name, path=None, target=None):
        old = name.removeprefix("ldbfx.")
        return importlib.util.spec_from_loader(name, self) if old != name and old in LAZY else None

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module("ldbfx." + LAZY[spec.name.removeprefix("ldbfx.")])
        self._own_specs[id(module)] = module.__spec__  # the import system sets the old name's next
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._own_specs.pop(id(module))


def register(package: ModuleType) -> None:
    """Registers the old names (called once, by ``ldbfx/__init__.py``)."""
    for old, new in CORE.items():
        module = importlib.import_module(f"ldbfx.{new}")
        sys.modules.setdefault(f"ldbfx.{old}", module)
        if not hasattr(package, old):  # ldbfx.layers, .branches, .install: the functions, as before
            setattr(package, old, module)
    if not any(isinstance(finder, _OldNames) for finder in sys.meta_path):
        sys.meta_path.append(_OldNames())
