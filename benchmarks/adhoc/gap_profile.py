"""One-off (2026-12-03, issue 13): where do ldbfx's few ms over freezing go on ResNet-50?

Compiles the baseline, the ideal (30% of the eligible layers frozen, the same subset as
benchmarks/compiled_path.py) and ldbfx with those layers dropped, then profiles STEPS steps of each,
interleaved over ROUNDS rounds. Prints, ldbfx minus the ideal (and the ideal minus the baseline):

* ``ops``: per op, calls and self CPU ms per step, largest differences first;
* ``calls``: each oneDNN convolution call (forward ``mkldnn_convolution``, ``convolution_backward``)
  matched across variants by its operands' shapes and output mask (the compiled backwards run them
  in different orders), the minimum over rounds of each, largest differences first.

One thread, the malloc settings of compiled_path.py's protocol. The profiler's own cost per op is
not small, and single calls swing by milliseconds: this explains, it does not time.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/adhoc/gap_profile.py [ROUNDS] [STEPS] [RESOLUTION]
"""

import json
import os
import sys
import tempfile
from collections import defaultdict

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import profile  # noqa: E402

import ldbfx  # noqa: E402
from ldbfx.bench import make_model, seeded_drop  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
RESOLUTION = int(sys.argv[3]) if len(sys.argv) > 3 else 64
torch.set_num_threads(1)
for knob in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, knob):
        setattr(torch._dynamo.config, knob, 64)
torch.manual_seed(0)
model = make_model("resnet50", RESOLUTION)
x, y = torch.randn(16, 3, RESOLUTION, RESOLUTION), torch.randint(0, 1000, (16,))
params = list(model.parameters())
named = dict(model.named_parameters())
gm = ldbfx.transform(model)
drop = seeded_drop(gm, 0.3)
drop_params = [named[p] for layer in drop for p in layer.params]
base, ldb = torch.compile(model), torch.compile(gm)


def freeze(flag):
    for p in drop_params:
        p.requires_grad_(not flag)


VARIANTS = {"baseline": (base, lambda: None, lambda: None),
            "ideal": (base, lambda: freeze(True), lambda: freeze(False)),
            "ldbfx": (ldb, lambda: ldbfx.set_dropped(gm, drop), lambda: ldbfx.set_dropped(gm, []))}


def step(module):
    for p in params:
        p.grad = None
    F.cross_entropy(module(x), y).backward()


for name, (module, setup, undo) in VARIANTS.items():  # compile
    setup()
    step(module)
    step(module)
    undo()

CONVOLUTIONS = ("aten::convolution_backward", "aten::mkldnn_convolution")
ops = {n: defaultdict(lambda: [0, 0.0]) for n in VARIANTS}
calls = {n: defaultdict(list) for n in VARIANTS}
trace = os.path.join(tempfile.mkdtemp(), "trace.json")
for r in range(ROUNDS):
    for name, (module, setup, undo) in VARIANTS.items():
        setup()
        step(module)
        with profile(record_shapes=True) as prof:
            for _ in range(STEPS):
                step(module)
        undo()
        for e in prof.key_averages():
            t = ops[name][e.key]
            t[0] += e.count
            t[1] += e.self_cpu_time_total / 1e3
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") in CONVOLUTIONS and e.get("ph") == "X"]
        seen = defaultdict(int)
        for e in sorted(events, key=lambda e: e["ts"]):
            a = e["args"]
            signature = (e["name"], str(a.get("Input Dims", [])[:3]), a.get("Concrete Inputs", [""])[-1])
            calls[name][signature + (seen[signature],)].append(e["dur"] / 1e3)
            seen[signature] += 1
n = ROUNDS * STEPS
per = {v: {k: (c / n, ms / n) for k, (c, ms) in d.items()} for v, d in ops.items()}
for a, b in (("ldbfx", "ideal"), ("ideal", "baseline")):
    keys = set(per[a]) | set(per[b])
    diff = sorted(keys, key=lambda k: -abs(per[a].get(k, (0, 0))[1] - per[b].get(k, (0, 0))[1]))
    total = sum(ms for _, ms in per[a].values()) - sum(ms for _, ms in per[b].values())
    print(f"\nops, {a} - {b}: self CPU {total:+.1f} ms per step (profiled)")
    for k in diff[:15]:
        (ca, ma), (cb, mb) = per[a].get(k, (0, 0)), per[b].get(k, (0, 0))
        print(f"  {ma - mb:+8.2f} ms  calls {ca:6.0f} vs {cb:6.0f}  {k}")
    # The same call (operands, output mask, occurrence) in both; a step's calls repeat per STEPS.
    matched = [(min(calls[a][k]) - min(calls[b][k]), k) for k in calls[a] if k in calls[b]]
    print(f"calls, {a} - {b}: {len(matched)} matched, {len(calls[a]) - len(matched)} only in {a}")
    for name in CONVOLUTIONS:
        print(f"  {name}: {sum(d for d, k in matched if k[0] == name) / STEPS:+.2f} ms per step (sum of minima)")
    for d, k in sorted(matched, key=lambda m: -abs(m[0]))[:6]:
        print(f"  {d:+7.2f} ms  {min(calls[a][k]):6.2f} vs {min(calls[b][k]):6.2f}  {k}")
