"""One-off (issue 13, ninth pass): does freezing also make the *forward* faster?

ldbfx's compiled graph is one graph for every mask, so its forward is the untransformed model's
whatever is dropped. Freezing compiles a graph for its one mask, and Inductor may compile that
forward differently. Forward time that freezing saves is out of reach of a runtime mask by
design. This times, per variant of ``benchmarks/compiled_path.py`` (ResNet-50, batch 16, the
same seeded 30% dropped, one thread), the forward alone (autograd recording, then freed) and the
whole step, in interleaved rounds, and prints each variant's minimum and the median per-round
difference from its reference.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        MALLOC_TOP_PAD_=1073741824 python benchmarks/adhoc/forward_share.py [resolution] [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import ldbfx
from ldbfx.bench import make_model, seeded_drop


def main(resolution: int = 64, rounds: int = 30) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model("resnet50", resolution)
    named = dict(model.named_parameters())
    params = list(model.parameters())
    x, y = torch.randn(16, 3, resolution, resolution), torch.randint(0, 1000, (16,))
    gm = ldbfx.transform(model)
    drop = seeded_drop(gm, 0.3)
    frozen = [named[p] for layer in drop for p in layer.params]
    base, transformed = torch.compile(model), torch.compile(gm)

    def freeze(flag):
        for p in frozen:
            p.requires_grad_(not flag)

    variants = {
        "baseline": (base, lambda: None, lambda: None),
        "ideal": (base, lambda: freeze(True), lambda: freeze(False)),
        "ldbfx0": (transformed, lambda: ldbfx.set_dropped(gm, []), lambda: None),
        "ldbfx": (transformed, lambda: ldbfx.set_dropped(gm, drop), lambda: ldbfx.set_dropped(gm, [])),
    }

    def measure(name):
        module, setup, undo = variants[name]
        setup()
        for p in params:
            p.grad = None
        start = time.perf_counter()
        loss = F.cross_entropy(module(x), y)
        forward = time.perf_counter() - start
        loss.backward()
        total = time.perf_counter() - start
        undo()
        return forward, total

    for name in variants:  # compile, then warm up
        measure(name)
        measure(name)
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % 4:] + names[: r % 4]:
            measure(n)  # a warm-up step of the same variant first, as compiled_path.py does
            times[n].append(measure(n))
    for part, i in (("forward", 0), ("step", 1)):
        mins = {n: 1e3 * min(t[i] for t in times[n]) for n in names}
        print(f"{part}: minima " + ", ".join(f"{n} {mins[n]:.1f}" for n in names) + " ms")
        for name, ref in (("ideal", "baseline"), ("ldbfx0", "baseline"), ("ldbfx", "ldbfx0"), ("ldbfx", "ideal")):
            diff = statistics.median(1e3 * (a[i] - b[i]) for a, b in zip(times[name], times[ref]))
            print(f"  {part}: median per-round {name} - {ref}: {diff:+.1f} ms")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
