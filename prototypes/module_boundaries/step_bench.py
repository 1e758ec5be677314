"""Eager per-step time (fwd+bwd+zero_grad), interleaved, min over rounds: plain model (no ldbfx),
flat graph installed on the root (today), (c) per-block graphs installed on the blocks, (b) module swap.
Usage: MALLOC_ARENA_MAX=2 python step_bench.py HIDDEN LAYERS BATCH SEQ ROUNDS [drop]"""
import sys, time, copy, warnings, logging, random, statistics, torch, ldbfx
from common import tiny_llama, batch
from blockwise import install_blocks
from swap import swap
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
torch.set_num_threads(1)
H, L, B, T, R = (int(a) for a in sys.argv[1:6]); drop = len(sys.argv) > 6 and sys.argv[6] == "drop"
base = tiny_llama(L, hidden=H); b = batch(B, T)
variants = {}
m = copy.deepcopy(base); variants["plain"] = (m, lambda n: None, lambda n: None)
m = copy.deepcopy(base); gm = ldbfx.transform(m, example_kwargs=b); ldbfx.install(m, gm)
variants["flat"] = (m, lambda n, g=gm: ldbfx.set_dropped(g, n), lambda n, g=gm: ldbfx.set_dropped_branches(g, n))
m = copy.deepcopy(base); bw = install_blocks(m, b)
variants["blocks(c)"] = (m, bw.set_dropped, bw.set_dropped_branches)
m = copy.deepcopy(base); sg = swap(m, b)
variants["swap(b)"] = (m, lambda n, g=sg: ldbfx.set_dropped(g, n), lambda n, g=sg: ldbfx.set_dropped_branches(g, n))
names = [l.name for l in ldbfx.layers(gm) if l.eligible and ".layers." in l.name]
branches = [x.name for x in ldbfx.branches(gm) if x.eligible]
rng = random.Random(0)
dl = rng.sample(names, len(names) // 3) if drop else []
db = branches[:1] if drop else []
for k, (m, sd, sb) in variants.items():
    if k != "plain": sd(dl); sb(db)
def step(m):
    m(**b).loss.backward(); m.zero_grad(set_to_none=True)
for k, (m, _, _) in variants.items():
    for _ in range(3): step(m)
times = {k: [] for k in variants}
order = list(variants)
S = 5
for r in range(R):
    order = order[1:] + order[:1]
    for k in order:
        m = variants[k][0]
        t = time.perf_counter()
        for _ in range(S): step(m)
        times[k].append((time.perf_counter() - t) / S * 1e3)
print(f"H={H} L={L} B={B} T={T} rounds={R} steps/turn={S} threads=1 dropped layers={len(dl)} branches={db}")
for k in variants:
    print(f"  {k:10s} min {min(times[k]):7.2f} ms  median {statistics.median(times[k]):7.2f} ms  "
          f"(min vs plain {min(times[k]) / min(times['plain']):.3f}, vs flat {min(times[k]) / min(times['flat']):.3f})")
