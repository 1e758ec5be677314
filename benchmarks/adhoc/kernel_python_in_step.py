"""One-off (2026-12-03, issue 13): what ldbfx's convolution kernel costs *inside* a compiled step.

``benchmarks/kernel_overhead.py`` measures the kernel on its own, calls in a row: ~20 us over the
aten call it wraps. In a real step each call follows a large oneDNN call that has been through the
caches. This script times, in compiled ResNet-50 steps with 30% of the eligible layers dropped,
each ``ldbfx::conv_backward`` (and ``conv_weight_grad``) call and the ``aten.convolution_backward``
inside it, without the profiler, and prints per step what the kernels spent outside the aten call:
by kind of layer (dropped, kept 1x1, kept kxk) and in the helpers that copy or fill
(``_strided_as``: calls and real copies; ``_dropped_weight_grad``: the zero dW; ``_skipped`` and
``row_selection``: the mask reads, the norms' ``masked_grad`` calls included). What the helpers
leave is the kernels' own Python. A CPU kernel registered for the op wins over its
CompositeExplicitAutograd one, so the shipped body runs, wrapped. Output of 2026-12-03:
``benchmarks/results/2026-12-03-cpu-kernel-python-in-step.txt``.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/adhoc/kernel_python_in_step.py [STEPS]
"""

import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ldbfx  # noqa: E402
from ldbfx.bench import make_model  # noqa: E402
from ldbfx.ops import kernels  # noqa: E402
from ldbfx.state import state_of  # noqa: E402

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
torch.set_num_threads(1)
torch.manual_seed(0)
model = make_model("resnet50", 64)
x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 1000, (16,))
gm = ldbfx.transform(model)
eligible = [layer for layer in ldbfx.layers(gm) if layer.eligible]
order = list(range(len(eligible)))
random.Random(0).shuffle(order)
ldbfx.set_dropped(gm, [eligible[i] for i in sorted(order[: round(0.3 * len(eligible))])])
compiled = torch.compile(gm)

inner, outer, kinds = [], [], []


class _TimedAten:
    """``torch.ops.aten`` with ``convolution_backward`` timed (what the kernel reads as ``_aten``)."""

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    @staticmethod
    def convolution_backward(*args):
        start = time.perf_counter()
        out = torch.ops.aten.convolution_backward(*args)
        inner.append(time.perf_counter() - start)
        return out


def timed(impl):
    def kernel(*args):
        start = time.perf_counter()
        out = impl(*args)
        outer.append(time.perf_counter() - start)
        weight, mask, index = args[2], args[3], args[4]
        kinds.append("dropped" if state_of(mask).is_dropped(mask, index)
                     else "kept 1x1" if weight.shape[2:].numel() == 1 else "kept kxk")
        return out
    return kernel


parts = {}


def timed_part(name, fn):
    """Times calls of the kernels' helper ``name`` (and counts those that copied) per step."""
    def wrapper(*args):
        start = time.perf_counter()
        out = fn(*args)
        entry = parts.setdefault(name, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += name == "_strided_as" and out.data_ptr() != args[0].data_ptr()
        entry[2] += time.perf_counter() - start
        return out
    return wrapper


for _name in ("_strided_as", "_dropped_weight_grad", "_skipped", "row_selection"):
    setattr(kernels, _name, timed_part(_name, getattr(kernels, _name)))
lib = torch.library.Library("ldbfx", "IMPL")
lib.impl("conv_backward", timed(kernels._conv_backward_impl), "CPU")
lib.impl("conv_weight_grad", timed(kernels._conv_weight_grad_impl), "CPU")  # the one whose input needs no dX
kernels._aten = _TimedAten()


def step():
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(compiled(x), y).backward()


step()
step()
per_step = []
for _ in range(STEPS):
    inner.clear()
    outer.clear()
    kinds.clear()
    parts.clear()
    start = time.perf_counter()
    step()
    total = time.perf_counter() - start
    assert len(inner) == len(outer) > 0, (len(inner), len(outer))
    each = [1e6 * (o - i) for o, i in zip(outer, inner)]  # us outside aten, per call
    by_kind = {k: (kinds.count(k), sum(e for e, kk in zip(each, kinds) if kk == k) / 1e3) for k in sorted(set(kinds))}
    per_step.append((total, sum(outer), sum(outer) - sum(inner), each, dict(parts), by_kind))
for total, kernel, rest, each, parts_ms, by_kind in per_step:
    print(f"step {1e3 * total:6.1f} ms; {len(each)} kernel calls {1e3 * kernel:6.1f} ms, of which outside "
          f"aten {1e3 * rest:5.2f} ms (per call median {statistics.median(each):5.1f} us, max {max(each):6.1f} us)")
    print("    parts (calls, copies, ms): " + ", ".join(f"{k} {n} {c} {1e3 * t:.2f}" for k, (n, c, t) in parts_ms.items()))
    print("    outside aten by kind (calls, ms): " + ", ".join(f"{k} {n} {ms:.2f}" for k, (n, ms) in by_kind.items()))
