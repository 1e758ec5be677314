"""One-off (2026-12-02, issue 13): allocating and zero-filling the dW of the 31 ResNet-50 layers
benchmarks/compiled_path.py drops (``z``) vs allocating only (``e``), minimum of 50. The runs
quoted in docs/benchmarks.md, as printed, with the protocol's malloc settings and then without:

    31 layers 25.581056 MB        31 layers 25.581056 MB
    z min 1.87 ms                 z min 2.14 ms
    e min 0.07 ms                 e min 0.07 ms
    z min 2.26 ms                 z min 1.99 ms
    e min 0.11 ms                 e min 0.07 ms
"""

import random, time, torch
import ldbfx
from ldbfx.bench import make_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = make_model("resnet50", 64)
named = dict(model.named_parameters())
gm = ldbfx.transform(model)
eligible = [l for l in ldbfx.layers(gm) if l.eligible]
order = list(range(len(eligible))); random.Random(0).shuffle(order)
drop = [eligible[i] for i in sorted(order[: round(0.3 * len(eligible))])]
dp = [named[p] for l in drop for p in l.params]
print(len(drop), "layers", sum(p.numel() for p in dp) * 4 / 1e6, "MB")
def z():
    return [torch.empty_strided(p.shape, p.stride()).zero_() for p in dp]
def e():
    return [torch.empty_strided(p.shape, p.stride()) for p in dp]
for f in (z, e, z, e):
    ts = []
    for i in range(50):
        t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t); del r
    print(f.__name__, "min %.2f ms" % (1e3 * min(ts)))
