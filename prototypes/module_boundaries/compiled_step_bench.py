"""Compiled per-step time (fwd+bwd), interleaved, min over rounds: plain model with HF-style regional
compile (block.compile(), no ldbfx), flat graph compiled whole (torch.compile(model) with ldbfx.install),
(c) per-block graphs with block.compile(). Layers dropped: none / a third of the in-block eligible ones.
Usage: MALLOC_ARENA_MAX=2 python compiled_step_bench.py HIDDEN LAYERS BATCH SEQ ROUNDS [drop]"""
import os, sys, time, copy, warnings, logging, random, statistics, tempfile
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ind35_"))
import torch, ldbfx
from common import tiny_llama, batch
from blockwise import install_blocks
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
torch.set_num_threads(1); torch._dynamo.config.recompile_limit = 64
from ldbfx.ops import native; native.available()
H, L, B, T, R = (int(a) for a in sys.argv[1:6]); drop = len(sys.argv) > 6 and sys.argv[6] == "drop"
base = tiny_llama(L, hidden=H); b = batch(B, T)
V = {}
m = copy.deepcopy(base)
for blk in m.model.layers: blk.compile()
V["plain+regional"] = (m, m, lambda n: None)
m = copy.deepcopy(base); gm = ldbfx.transform(m, example_kwargs=b); ldbfx.install(m, gm)
V["flat+whole"] = (m, torch.compile(m), lambda n, g=gm: ldbfx.set_dropped(g, n))
m = copy.deepcopy(base); bw = install_blocks(m, b)
for blk in bw.blocks.values(): blk.compile()
V["blocks(c)+regional"] = (m, m, bw.set_dropped)
names = [l.name for l in ldbfx.layers(gm) if l.eligible and ".layers." in l.name]
dl = random.Random(0).sample(names, len(names) // 3) if drop else []
for k, (m, run, sd) in V.items(): sd(dl)
def step(m, run): run(**b).loss.backward(); m.zero_grad(set_to_none=True)
for k, (m, run, _) in V.items():
    t = time.perf_counter(); step(m, run); c = time.perf_counter() - t
    for _ in range(2): step(m, run)
    print(f"{k}: first step (compile) {c:.1f}s")
times = {k: [] for k in V}; order = list(V); S = 5
for r in range(R):
    order = order[1:] + order[:1]
    for k in order:
        m, run, _ = V[k]; t = time.perf_counter()
        for _ in range(S): step(m, run)
        times[k].append((time.perf_counter() - t) / S * 1e3)
print(f"H={H} L={L} B={B} T={T} rounds={R} dropped layers={len(dl)} (compiled)")
for k in V:
    print(f"  {k:20s} min {min(times[k]):7.2f} ms  median {statistics.median(times[k]):7.2f} ms  vs flat {min(times[k]) / min(times['flat+whole']):.3f}")
