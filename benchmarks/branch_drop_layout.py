"""Is compiled branch drop's fixed cost a layout effect? ResNet-50 64 px, batch 16, compiled.

    python benchmarks/branch_drop_layout.py cl        # model and input in channels_last
    python benchmarks/branch_drop_layout.py contiguous

Variants: the compiled baseline, the transformed model with branch drop in use and nothing
dropped, and with 4 of the 14 eligible branches dropped (seeded). 5 interleaved rounds of 2
steps, minimum. Prints each variant's step time and its difference to the baseline.
"""
import random
import sys
import time

import torch
import torch.nn.functional as F

import ldbfx
from ldbfx.bench import make_model

torch._dynamo.config.recompile_limit = 64
cl = sys.argv[1] == "cl"
torch.manual_seed(0)
model = make_model("resnet50", 64)
x = torch.randn(16, 3, 64, 64); y = torch.randint(0, 1000, (16,))
if cl:
    model = model.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
gm = ldbfx.transform(model)
gm.ldbfx_state.branch_cut = True
eligible = [b for b in ldbfx.branches(gm) if b.eligible]
drop = [eligible[i] for i in sorted(random.Random(0).sample(range(len(eligible)), 4))]
base, br = torch.compile(model), torch.compile(gm)
params = list(model.parameters())
def step(m):
    for p in params: p.grad = None
    F.cross_entropy(m(x), y).backward()
V = {"baseline": (base, []), "branch@0": (br, []), "branch@4": (br, drop)}
for n, (m, d) in V.items():
    ldbfx.set_dropped_branches(gm, d); t = time.time(); step(m); print(n, "first", round(time.time() - t, 1), flush=True)
T = {n: [] for n in V}
for r in range(5):
    for n in list(V)[r % 3:] + list(V)[:r % 3]:
        m, d = V[n]; ldbfx.set_dropped_branches(gm, d); step(m)
        t = time.perf_counter(); step(m); step(m); T[n].append((time.perf_counter() - t) / 2)
b = min(T["baseline"])
print(sys.argv[1], {n: f"{1e3*min(t):.0f} ms ({100*(min(t)/b-1):+.1f}%)" for n, t in T.items()}, flush=True)
