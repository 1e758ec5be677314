"""`import ldbfx` stays light: no networkx, matplotlib, torchvision, timm, and no CUDA init."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, torch, ldbfx\n"
        "heavy = [m for m in ('networkx', 'matplotlib', 'torchvision', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert sorted(ldbfx.__all__) == sorted(set(ldbfx.__all__))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
