"""The examples in ldbfx's docstrings run as written (``doctest``), so the docs cannot drift."""

import doctest
import importlib
import pkgutil

import pytest

import ldbfx

MODULES = sorted(m.name for m in pkgutil.walk_packages(ldbfx.__path__, "ldbfx.") if not m.name.endswith("__main__"))


# An example that warns (no eligible layer, say) would teach a user to ignore ldbfx's warnings.
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("name", ["ldbfx", *MODULES])
def test_docstring_examples_run(name):
    if name == "ldbfx.hf":
        pytest.importorskip("transformers")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (printed above)"
