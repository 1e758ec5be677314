"""Native kernels of the compiled path: ``native.cpp``, built with the system's C++ compiler on
first use and cached by PyTorch (``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by
default).

The compiled backward calls one mask-reading kernel per layer and step. Their Python bodies cost
~11 us per call more than the C++ ones in a loop, and 60-70 us per call inside a compiled
ResNet-50 step on a 2-core CPU, where caches are cold: 3-4 ms of such a step (docs/benchmarks.md,
"What one kernel call costs"; docs/history.md, "The compiled path: mechanisms compared"). The C++ bodies do the same work with the
same aten calls (the same bytes), without Python. Building needs a C++ compiler (ninja comes
with ldbfx) and takes 8-15 s on 2 cores, once per machine and torch version. Where the build fails, or
``LDBFX_NATIVE=0`` is set, the Python kernels run instead: the same gradients, and one warning
that says why.

Example:
    >>> from ldbfx.ops import native
    >>> native.available() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch

from ..runtime.state import native_records_in_use

_SOURCE = Path(__file__).with_name("native.cpp")
#: The ops ``native.cpp`` implements (``ldbfx::<name>_native``, defined in ``ops.kernels``).
NAMES = ("conv_backward", "conv_weight_grad", "linear_weight_grad", "masked_grad")

_available: bool | None = None
_lock = threading.Lock()  # one build per process, even if two threads compile at once
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
        with _lock:
            if _available is None:
                _available = _load()
    return _available


def _build_name() -> str:
    """The extension's name, one per source and torch build: venvs with different torch versions
    share PyTorch's extension cache, and must not rebuild (or load) each other's library."""
    key = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return f"ldbfx_native_{key}"


_STALE_S = 600  # seconds; a build takes ~15 s on 2 cores


def _stale_build_lock(name: str) -> Path | None:
    """A lock file left in the build folder by a killed build, on PyTorch versions that wait on
    one forever (``FileBaton``; later versions hold an OS lock, released when its holder dies).
    A build takes seconds here, so a lock older than ``_STALE_S`` is taken as abandoned."""
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "FileLock"):
        return None
    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None
    return lock if age > _STALE_S else None


def _load() -> bool:
    global reason
    setting = os.environ.get("LDBFX_NATIVE", "1")
    if setting.strip().lower() in ("0", "false", "off", "no"):
        reason = f"LDBFX_NATIVE={setting}"
        return False
    # The schemas the library implements are defined by ops.kernels, which imports this module
    # (for NAMES) and which ``ldbfx.ops`` imports before anything can call this.

    # torch's loader logs a warning on machines without CUDA that concerns CUDA sources only.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    saved_path = os.environ.get("PATH", "")
    name = _build_name()
    try:
        lock = _stale_build_lock(name)
        if lock is not None:  # torch would wait on it forever, inside the user's first compile
            reason = f"a stale build lock, {lock}"
            warnings.warn(
                f"ldbfx: {lock} was left by a build that did not finish (a killed process?), and "
                "this PyTorch would wait on it forever; the Python kernels run instead (the same "
                "gradients, ~11-70 us more per layer and step). Delete that file to build the "
                "native kernels.", RuntimeWarning, stacklevel=2)
            return False
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary, outside an activated venv
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved_path
        library = load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O2"],
                       is_python_module=False, verbose=False)
        # The registry of control buffers, called through ctypes: outside the dispatcher, so no
        # active mode (a fake-tensor trace while a state is finalised) intercepts it.
        control = ctypes.CDLL(library).ldbfx_native_control
        control.argtypes, control.restype = [ctypes.c_void_p, ctypes.c_int64], None
    except Exception as exc:  # noqa: BLE001  (any build failure: fall back, and say so)
        lines = str(exc).strip().splitlines() or [""]
        reason = next((line.strip() for line in lines if "error:" in line), lines[-1].strip())
        if isinstance(exc, PermissionError):  # the build folder, not the compiler
            fix = ("Point TORCH_EXTENSIONS_DIR at a writable folder (PyTorch builds extensions in "
                   "~/.cache/torch_extensions by default)")
        else:
            fix = "Install a C++ compiler (g++ or clang) to build them"
        warnings.warn(
            f"ldbfx: the native compiled-path kernels could not be built ({reason}); the Python "
            f"kernels run instead (the same gradients, ~11-70 us more per layer and step). {fix}, "
            "or set LDBFX_NATIVE=0 to silence this.",
            RuntimeWarning, stacklevel=2)
        return False
    finally:
        logger.setLevel(level)
        os.environ["PATH"] = saved_path
    reason = None
    native_records_in_use(control)  # registers live states' control buffers; the hook merges records
    return True
