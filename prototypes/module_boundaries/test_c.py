"""(c) per-block capture + install: exactness of mask-gated dW and branch drop vs freezing / detaching."""
import copy, torch, ldbfx
from common import tiny_llama, batch, grads, close
from blockwise import install_blocks

model = tiny_llama(4)
ref = copy.deepcopy(model)
b = batch()
bw = install_blocks(model, b)
print("blocks:", list(bw.bgms))
print("block gm code identical across blocks:", len({g.code for g in bw.bgms.values()}) == 1)
print(bw.bgms["model.layers.1"].code[:1500])
# 1) nothing dropped: same loss and grads as the untransformed model
model.train(); ref.train()
l1 = model(**b).loss; l1.backward()
l0 = ref(**b).loss; l0.backward()
print("loss", l1.item(), l0.item(), "grads close (nothing dropped):", close(grads(model), grads(ref)) == [])
# 2) drop layers across blocks, compare with freezing the same params in ref
drop = ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.3.post_attention_layernorm"]
bw.set_dropped(drop)
model.zero_grad(set_to_none=True); ref.zero_grad(set_to_none=True)
for n in drop:
    for p in ref.get_submodule(n).parameters(): p.requires_grad_(False)
model(**b).loss.backward(); ref(**b).loss.backward()
print("dropped dW is None:", [model.get_submodule(n).weight.grad is None for n in drop])
print("grads vs freezing:", close(grads(model), grads(ref)))
for n in drop:
    for p in ref.get_submodule(n).parameters(): p.requires_grad_(True)
bw.set_dropped([])
# 3) branch drop: model.layers.2.mlp dropped == detach mlp output
bw.set_dropped_branches(["model.layers.2.mlp"])
model.zero_grad(set_to_none=True); ref.zero_grad(set_to_none=True)
mlp = ref.model.layers[2].mlp
h = mlp.register_forward_hook(lambda m, i, o: o.detach())
model(**b).loss.backward(); ref(**b).loss.backward(); h.remove()
print("branch drop grads vs detach:", close(grads(model), grads(ref)))
print("skip record per block:", {k: sorted(g.ldbfx_state.skipped) for k, g in bw.bgms.items()})
# 4) optimizer skip hook on the per-block states
bw.set_dropped_branches([]); bw.set_dropped(["model.layers.1.self_attn.q_proj"])
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
model.zero_grad(set_to_none=False)  # zeros left in .grad: the hook must turn them to None
w = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
model(**b).loss.backward(); opt.step()
print("dropped layer untouched by AdamW (weight decay):", torch.equal(w, model.model.layers[1].self_attn.q_proj.weight))
# 5) no_grad -> original forward; generate still works
with torch.no_grad():
    print("no_grad logits equal:", torch.allclose(model(**b).logits, ref(**b).logits, atol=1e-5) or "params moved (ok)")
