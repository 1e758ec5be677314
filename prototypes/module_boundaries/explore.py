import torch, ldbfx, time
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, use_cache=False)
model = LlamaForCausalLM(cfg)
ids = torch.randint(0, 64, (2, 16))
t = time.perf_counter()
gm = ldbfx.transform(model, example_kwargs={"input_ids": ids, "labels": ids})
print("transform s", time.perf_counter() - t)
for l in ldbfx.layers(gm): print(l.index, l.name, l.eligible, l.reason, l.kind)
for b in ldbfx.branches(gm): print(b.index, b.name, b.block, b.layers, b.eligible)
# record block kwargs
rec = {}
def pre(m, args, kwargs):
    rec["args"], rec["kwargs"] = args, kwargs
h = model.model.layers[1].register_forward_pre_hook(pre, with_kwargs=True)
model(input_ids=ids, labels=ids)
h.remove()
print([type(a) for a in rec["args"]], {k: (type(v), getattr(v, "shape", None) if not isinstance(v, tuple) else [x.shape for x in v]) for k, v in rec["kwargs"].items()})
print(gm.code[:3000])
