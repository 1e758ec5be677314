"""One-off (2026-12-02, issue 13): the compiled path with nothing dropped when all of ResNet-50's
layers are eligible, only the non-norm ones, or none (``transform(filter=...)``), against the
untransformed model; one process, interleaved, minimum over ROUNDS rounds (argv[1]), malloc
settings of benchmarks/compiled_path.py's protocol. The run quoted in docs/benchmarks.md, as printed:

    ldbfx0 102
    ldbfx0_noBN 51
    ldbfx0_none 0
    {'baseline': 595.0, 'ldbfx0': 594.7, 'ldbfx0_noBN': 589.3, 'ldbfx0_none': 590.6}
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
model = make_model("resnet50", 64)
x = torch.randn(16, 3, 64, 64); y = torch.randint(0, 1000, (16,))
params = list(model.parameters())
V = {"baseline": torch.compile(model),
     "ldbfx0": torch.compile(ldbfx.transform(model)),
     "ldbfx0_noBN": torch.compile(ldbfx.transform(model, filter=lambda m, n: not isinstance(m, torch.nn.BatchNorm2d))),
     "ldbfx0_none": torch.compile(ldbfx.transform(model, filter=lambda m, n: False))}
for n in list(V)[1:]:
    print(n, sum(l.eligible for l in ldbfx.layers(V[n]._orig_mod)))
def run(n):
    m = V[n]
    for _ in range(2):
        for p in params: p.grad = None
        t = time.perf_counter()
        F.cross_entropy(m(x), y).backward()
        el = time.perf_counter() - t
    return el
for n in V: run(n)
names = list(V); R = {n: [] for n in names}
for r in range(int(sys.argv[1])):
    for n in names[r % len(names):] + names[: r % len(names)]:
        R[n].append(run(n))
b = {n: 1e3 * min(v) for n, v in R.items()}
print({n: round(v, 1) for n, v in b.items()})
