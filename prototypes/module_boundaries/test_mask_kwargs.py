"""Risk: HF's per-layer kwargs differ from batch to batch (attention_mask None vs a 4-D mask, batch-1
position embeddings). What does an installed block graph do when they change?"""
import copy, warnings, logging, torch, ldbfx
from common import tiny_llama, batch
from blockwise import install_blocks, _record_inputs, _blocks
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
m = tiny_llama(4); ref = copy.deepcopy(m); b = batch()
bw = install_blocks(m, b)   # example batch without attention_mask -> blocks captured with attention_mask=None
padded = {**b, "attention_mask": torch.ones_like(b["input_ids"])}
padded["attention_mask"][0, :5] = 0
seen = _record_inputs(ref, _blocks(ref), padded)["model.layers.1"][1]
print("block kwargs on a padded batch: attention_mask =", type(seen["attention_mask"]).__name__,
      getattr(seen["attention_mask"], "shape", None))
try:
    out = m(**padded).loss; r = ref(**padded).loss
    print("padded batch through None-captured blocks:", out.item(), "reference:", r.item(), "SILENTLY WRONG" if abs(out.item() - r.item()) > 1e-5 else "ok")
except Exception as e:
    print("padded batch refused:", type(e).__name__, str(e).splitlines()[0][:300])
# other shapes: batch 3, seq 24 (dynamic dims)
b2 = batch(3, 24, seed=5)
print("batch 3 x 24:", torch.allclose(m(**b2).loss, ref(**b2).loss))
# explicit position_ids with batch > 1 (position_embeddings batch dim was specialised to 1)
pid = torch.arange(16).expand(2, 16)
try:
    print("explicit position_ids (2,16):", torch.allclose(m(**b, position_ids=pid).loss, ref(**b, position_ids=pid).loss))
except Exception as e:
    print("explicit position_ids refused:", type(e).__name__, str(e).splitlines()[0][:300])
