"""Native kernels of the compiled path: ``native.cpp``, built with the system's C++ compiler on
first use and cached by PyTorch (``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by
default).

The compiled backward calls one mask-reading kernel per layer and step. Their Python bodies cost
50-70 us per call inside a compiled ResNet-50 step on a 2-core CPU (docs/design.md), about what
keeps the compiled path below freezing's saving there. The C++ bodies do the same work with the
same aten calls (the same bytes), without Python. Building needs a C++ compiler (ninja comes
with ldbfx) and takes about 15 s, once per machine and torch version. Where the build fails, or
``LDBFX_NATIVE=0`` is set, the Python kernels run instead: the same gradients, and one warning
that says why.

Example:
    >>> from ldbfx.ops import native
    >>> native.available() in (True, False)
    True
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..state import native_records_in_use

_SOURCE = Path(__file__).with_name("native.cpp")
#: The ops ``native.cpp`` implements (``ldbfx::<name>_native``, defined in ``ops.kernels``).
NAMES = ("conv_backward", "linear_weight_grad", "masked_grad")

_available: bool | None = None
#: Why the native kernels are not in use, once :func:`available` has answered ``False``.
reason: str | None = None


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native kernels are loaded; builds and loads them on the first call.

    Usually first called while ``torch.compile`` traces a backward: marked as a constant result,
    it runs as plain Python then (the build, its warning), not traced.
    """
    global _available
    if _available is None:
        _available = _load()
    return _available


def _load() -> bool:
    global reason
    if os.environ.get("LDBFX_NATIVE", "1") == "0":
        reason = "LDBFX_NATIVE=0"
        return False
    from . import kernels  # noqa: F401  (defines the schemas the library implements)

    # torch's loader logs a warning on machines without CUDA that concerns CUDA sources only.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    saved_path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary, outside an activated venv
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved_path
        load(name="ldbfx_native", sources=[str(_SOURCE)], extra_cflags=["-O2"], is_python_module=False,
             verbose=False)
    except Exception as exc:  # noqa: BLE001  (any build failure: fall back, and say so)
        lines = str(exc).strip().splitlines() or [""]
        reason = next((line.strip() for line in lines if "error:" in line), lines[-1].strip())
        warnings.warn(
            f"ldbfx: the native compiled-path kernels could not be built ({reason}); the Python "
            "kernels run instead (the same gradients, ~20-60 us more per layer and step). Install a "
            "C++ compiler (g++ or clang) to build them, or set LDBFX_NATIVE=0 to silence this.",
            RuntimeWarning, stacklevel=2)
        return False
    finally:
        logger.setLevel(level)
        os.environ["PATH"] = saved_path
    reason = None
    native_records_in_use()  # from now on, the optimizer hook merges the kernels' records
    return True
