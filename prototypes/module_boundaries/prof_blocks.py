import cProfile, pstats, warnings, logging, torch, sys
from common import tiny_llama, batch
from blockwise import install_blocks
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
torch.set_num_threads(1)
m = tiny_llama(4); b = batch()
if sys.argv[1] == "blocks": install_blocks(m, b)
else:
    import ldbfx; ldbfx.install(m, ldbfx.transform(m, example_kwargs=b))
def step(): m(**b).loss.backward(); m.zero_grad(set_to_none=True)
for _ in range(5): step()
pr = cProfile.Profile(); pr.enable()
for _ in range(100): step()
pr.disable()
st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(18)
