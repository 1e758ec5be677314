"""One-off (2026-12-02, issue 13): two independently compiled copies of each variant of
benchmarks/compiled_path.py (deep copies of ResNet-50, 64 px, batch 16, each transformed and
compiled on its own) timed in one process, interleaved; per variant the minimum over ROUNDS
rounds (argv[1]) of the second of two steps. Run with the malloc settings of that script's
protocol. The run quoted in docs/benchmarks.md ("The kernels' own cost"), as printed:

    {'baseline_a': 560.3, 'ideal_a': 505.6, 'ldbfx0_a': 563.6, 'ldbfx_a': 512.2, 'baseline_b': 558.7,
     'ideal_b': 505.5, 'ldbfx0_b': 562.3, 'ldbfx_b': 510.7}
    a share 88%  cost +0.6%
    b share 90%  cost +0.6%
"""

import sys, time, random, os, tempfile, copy
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
import torch, torch.nn.functional as F
import ldbfx
from ldbfx.bench import make_model
torch.set_num_threads(1)
for knob in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, knob): setattr(torch._dynamo.config, knob, 64)
torch.manual_seed(0)
base_model = make_model("resnet50", 64)
x = torch.randn(16, 3, 64, 64); y = torch.randint(0, 1000, (16,))
V = {}
for rep in "ab":
    model = copy.deepcopy(base_model)
    params = list(model.parameters()); named = dict(model.named_parameters())
    gm = ldbfx.transform(model)
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    order = list(range(len(eligible))); random.Random(0).shuffle(order)
    drop = [eligible[i] for i in sorted(order[: round(0.3 * len(eligible))])]
    dp = [named[p] for l in drop for p in l.params]
    cb = torch.compile(model); cg = torch.compile(gm)
    def freeze(f, dp=dp):
        for p in dp: p.requires_grad_(not f)
    V["baseline_" + rep] = (cb, params, lambda: None, lambda: None)
    V["ideal_" + rep] = (cb, params, lambda freeze=freeze: freeze(True), lambda freeze=freeze: freeze(False))
    V["ldbfx0_" + rep] = (cg, params, lambda gm=gm: ldbfx.set_dropped(gm, []), lambda: None)
    V["ldbfx_" + rep] = (cg, params, lambda gm=gm, drop=drop: ldbfx.set_dropped(gm, drop), lambda gm=gm: ldbfx.set_dropped(gm, []))
def run(n):
    m, params, s, u = V[n]; s()
    for _ in range(2):
        for p in params: p.grad = None
        t = time.perf_counter()
        F.cross_entropy(m(x), y).backward()
        el = time.perf_counter() - t
    u(); return el
for n in V: run(n)
names = list(V); R = {n: [] for n in names}
for r in range(int(sys.argv[1])):
    for n in names[r % len(names):] + names[: r % len(names)]:
        R[n].append(run(n))
b = {n: 1e3 * min(v) for n, v in R.items()}
print({n: round(v, 1) for n, v in b.items()})
for rep in "ab":
    s = (b["baseline_" + rep] - b["ldbfx_" + rep]) / (b["baseline_" + rep] - b["ideal_" + rep])
    print(rep, "share %.0f%%  cost %+.1f%%" % (100 * s, 100 * (b["ldbfx0_" + rep] / b["baseline_" + rep] - 1)))
