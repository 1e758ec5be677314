"""One-off (issue 13, eighth pass): what the compiled path's kernels cost per step, Python vs C++.

Compiles the transformed ResNet-50 (64 px, batch 16, 31 of 102 eligible layers dropped, the
seeded choice of ``compiled_path.py``) twice, with the Python kernels (``library``) and with the
C++ ones (``native``, ldbfx/ops/native.cpp), and profiles single steps of each, interleaved, one
thread. Per step it sums the profiler's *self* CPU time of the ``ldbfx::*`` ops: the time spent
in the kernels themselves, outside the aten ops they call (which the profiler records as
children). That is the part of the step the C++ bodies remove; the aten work is the same calls.
Step times under the profiler are printed too, for information only (the profiler adds its own
cost per op).

    python benchmarks/adhoc/native_kernel_self_time.py 6
"""

from __future__ import annotations

import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ldbfx
from ldbfx.bench import make_model
from ldbfx.ops import path


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model("resnet50", 64)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 1000, (16,))
    variants = {}
    for mechanism in ("library", "native"):
        gm = ldbfx.transform(model)
        eligible = [layer for layer in ldbfx.layers(gm) if layer.eligible]
        order = list(range(len(eligible)))
        random.Random(0).shuffle(order)
        ldbfx.set_dropped(gm, [eligible[i] for i in sorted(order[: round(0.3 * len(eligible))])])
        with path.using_mechanism(mechanism):
            compiled = torch.compile(gm)
            for _ in range(2):  # compile, then warm
                model.zero_grad(set_to_none=True)
                F.cross_entropy(compiled(x), y).backward()
        variants[mechanism] = compiled
    self_ms = {name: [] for name in variants}
    step_ms = {name: [] for name in variants}
    calls = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            model.zero_grad(set_to_none=True)
            # The mechanism is guarded on: outside its context the call would recompile.
            with path.using_mechanism(name), profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                F.cross_entropy(variants[name](x), y).backward()
                step_ms[name].append(1e3 * (time.perf_counter() - start))
            ours = [e for e in prof.key_averages() if e.key.startswith("ldbfx::")]
            self_ms[name].append(sum(e.self_cpu_time_total for e in ours) / 1e3)
            calls[name] = {e.key: e.count for e in ours}
    for name in variants:
        print(f"{name}: ldbfx kernels' self time per step, ms: min {min(self_ms[name]):.2f}, "
              f"all {[round(t, 2) for t in self_ms[name]]}; calls {calls[name]}; "
              f"step under the profiler, min {min(step_ms[name]):.1f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
