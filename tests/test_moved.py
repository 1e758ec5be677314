"""The old module paths still import the moved modules: the same objects, not copies."""

import importlib
import subprocess
import sys

import pytest

import ldbfx
from ldbfx.moved import CORE, LAZY


@pytest.mark.parametrize("old, new", sorted({**CORE, **LAZY}.items()))
def test_an_old_path_is_the_moved_module(old, new):
    if old == "hf":
        pytest.importorskip("transformers")
    moved = importlib.import_module(f"ldbfx.{new}")
    assert importlib.import_module(f"ldbfx.{old}") is moved
    assert moved.__spec__.name == f"ldbfx.{new}"  # the alias did not rename the module


def test_the_package_functions_keep_their_names():
    # ldbfx.layers, ldbfx.branches and ldbfx.install are functions; their old modules' names
    # must not replace them when the old module paths are imported.
    import ldbfx.branches  # noqa: F401
    import ldbfx.install  # noqa: F401
    import ldbfx.layers  # noqa: F401

    assert all(callable(f) and not isinstance(f, type(ldbfx)) for f in (ldbfx.layers, ldbfx.branches, ldbfx.install))
    assert ldbfx.inspect is importlib.import_module("ldbfx.integrations.inspection")


def test_an_old_path_imports_in_a_fresh_process():
    # First import of the application under its old name, before anything else of it is loaded.
    code = "from ldbfx.train import TrainConfig; import ldbfx.app.train as t; print(TrainConfig is t.TrainConfig)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
