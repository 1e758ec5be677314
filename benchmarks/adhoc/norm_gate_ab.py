"""One-off A/B (issue 13, seventh pass): what do the norms' gated gradients cost the compiled step?

ResNet-50's compiled backward calls ``ldbfx::masked_grad`` 106 times per step (the BatchNorm
affines of eligible layers): an opaque Python kernel each, which Inductor cannot fuse. This
compiles the transformed model twice, once as shipped and once with ``_MaskedParam.backward``
patched (at trace time) to gate in the graph with ``torch.where`` on the mask, and times them with
the baseline and the ideal, interleaved, one thread, minimum over rounds (compiled_path.py's
protocol), and prints the median of the per-round paired differences. The patched variant
records no skip for the optimizer: a timing probe, not a mode.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/adhoc/norm_gate_ab.py 20
"""

from __future__ import annotations

import random
import sys
import time

import torch
import torch.nn.functional as F

import ldbfx
from ldbfx.bench import make_model
from ldbfx.ops import gating


def _where_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return torch.where(mask[ctx.index], grad.new_zeros(()), grad), None, None


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model("resnet50", 64)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 1000, (16,))
    params = list(model.parameters())
    named = dict(model.named_parameters())
    gm_kernel, gm_where = ldbfx.transform(model), ldbfx.transform(model)
    eligible = [layer for layer in ldbfx.layers(gm_kernel) if layer.eligible]
    order = list(range(len(eligible)))
    random.Random(0).shuffle(order)
    drop = [eligible[i] for i in sorted(order[: round(0.3 * len(eligible))])]
    drop_params = [named[p] for layer in drop for p in layer.params]

    def freeze(flag):
        for p in drop_params:
            p.requires_grad_(not flag)

    base = torch.compile(model)
    variants = {
        "baseline": (base, lambda: None, lambda: None),
        "ideal": (base, lambda: freeze(True), lambda: freeze(False)),
        "kernel": (torch.compile(gm_kernel), lambda: ldbfx.set_dropped(gm_kernel, drop),
                   lambda: ldbfx.set_dropped(gm_kernel, [])),
        "where": (torch.compile(gm_where), lambda: ldbfx.set_dropped(gm_where, drop),
                  lambda: ldbfx.set_dropped(gm_where, [])),
    }

    def step(module):
        for p in params:
            p.grad = None
        F.cross_entropy(module(x), y).backward()

    def run(name):
        module, setup, undo = variants[name]
        setup()
        step(module)
        start = time.perf_counter()
        step(module)
        elapsed = time.perf_counter() - start
        undo()
        return elapsed

    shipped = gating._MaskedParam.backward
    for name in variants:
        if name == "where":
            gating._MaskedParam.backward = staticmethod(_where_backward)
        run(name)
        gating._MaskedParam.backward = shipped
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(run(n))
    best = {n: min(t) for n, t in times.items()}
    saving = best["baseline"] - best["ideal"]
    for n in names:
        share = "" if n in ("baseline", "ideal") else \
            f"  share of ideal {(best['baseline'] - best[n]) / saving:.1%}  gap {1e3 * (best[n] - best['ideal']):+.1f} ms"
        print(f"{n:9s} {1e3 * best[n]:7.1f} ms{share}", flush=True)
    # Paired by round (each round runs every variant back to back): the median of the per-round
    # differences cancels the slow drift that the minima of separate variants do not. With an even
    # number of rounds this prints the upper of the two middle differences (the recorded run 2 of
    # 24 rounds did), not their mean as compiled_path.py's paired_medians does.
    for n in ("kernel", "where"):
        diffs = sorted(1e3 * (a - b) for a, b in zip(times[n], times["ideal"]))
        print(f"{n:9s} minus ideal, median over rounds {diffs[len(diffs) // 2]:+.1f} ms", flush=True)
    diffs = sorted(1e3 * (a - b) for a, b in zip(times["where"], times["kernel"]))
    print(f"where minus kernel, median over rounds {diffs[len(diffs) // 2]:+.1f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
