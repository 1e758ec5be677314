"""Compile time and recompiles: whole flat graph (torch.compile(model) with ldbfx.install) vs
per-block graphs (block.compile() on each decoder block), tiny Llama with N layers.
Usage: python compile_bench.py flat|blocks|blocks_noshare|plain_blocks [layers]"""
import os, sys, time, warnings, logging, tempfile
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ind35_"))  # fresh cache
import torch, ldbfx
import torch._dynamo.utils as du
from common import tiny_llama, batch
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
mode = sys.argv[1]; L = int(sys.argv[2]) if len(sys.argv) > 2 else 10
torch._dynamo.config.recompile_limit = 64
from ldbfx.ops import native; native.available()  # build/load the C++ kernels outside the timing
model = tiny_llama(L); b = batch()
t0 = time.perf_counter()
if mode == "flat":
    gm = ldbfx.transform(model, example_kwargs=b); ldbfx.install(model, gm)
    setd = lambda names: ldbfx.set_dropped(gm, names)
    setb = lambda names: ldbfx.set_dropped_branches(gm, names)
    run = torch.compile(model)
elif mode.startswith("blocks"):
    from blockwise import install_blocks
    bw = install_blocks(model, b, share_code=(mode == "blocks"))
    setd, setb = bw.set_dropped, bw.set_dropped_branches
    for blk in bw.blocks.values(): blk.compile()
    run = model
elif mode == "swap":
    from swap import swap
    gm = swap(model, b)
    setd = lambda names: ldbfx.set_dropped(gm, names)
    setb = lambda names: ldbfx.set_dropped_branches(gm, names)
    for blk in model.model.layers: blk.compile()
    run = model
elif mode == "plain_blocks":  # no ldbfx: HF-style regional compile, for reference
    for blk in model.model.layers: blk.compile()
    run = model; setd = setb = lambda names: None
capture_s = time.perf_counter() - t0
def step():
    loss = run(**b).loss; loss.backward(); model.zero_grad(set_to_none=True)
t0 = time.perf_counter(); step(); first = time.perf_counter() - t0
t0 = time.perf_counter(); step(); second = time.perf_counter() - t0
g0 = du.counters["stats"]["unique_graphs"]
eligible = [l.name for l in (ldbfx.layers(gm) if mode in ("flat", "swap") else bw.layers if mode != "plain_blocks" else []) if l.eligible and ".layers." in l.name]
import random; rng = random.Random(0)
for k in range(6):
    setd(rng.sample(eligible, min(8, len(eligible))) if eligible else []); step()
g1 = du.counters["stats"]["unique_graphs"]
t0 = time.perf_counter()
if mode != "plain_blocks":
    br = [x.name for x in (ldbfx.branches(gm) if mode in ("flat", "swap") else bw.branches) if x.eligible]
    setb(br[:2]); step()
branch_first = time.perf_counter() - t0
g2 = du.counters["stats"]["unique_graphs"]
for k in range(4):
    if mode != "plain_blocks": setb(rng.sample(br, 3)); step()
g3 = du.counters["stats"]["unique_graphs"]
print(f"{mode} L={L}: capture+install {capture_s:.1f}s  first step (compile) {first:.1f}s  second step {second*1e3:.0f}ms  "
      f"graphs after first steps {g0}, after 6 layer masks {g1}, first branch drop {branch_first:.1f}s -> {g2}, "
      f"after 4 branch masks {g3}; graph breaks {sum(du.counters['graph_break'].values())}")
print("break reasons:", dict(list(du.counters["graph_break"].items())[:6]))
