"""(b) module swap: exactness (dropped dW, branch drop) and FSDP2-free checks; ldbfx.set_dropped on the analysis gm."""
import copy, warnings, logging, torch, ldbfx
from common import tiny_llama, batch, grads, close
from swap import swap
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
model = tiny_llama(4); ref = copy.deepcopy(model); b = batch()
full = swap(model, b)
print("state_dict keys unchanged:", list(model.state_dict()) == list(ref.state_dict()))
l1 = model(**b).loss; l1.backward(); l0 = ref(**b).loss; l0.backward()
print("nothing dropped:", l1.item() == l0.item(), close(grads(model), grads(ref)) == [])
drop = ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.3.post_attention_layernorm", "model.norm"]
ldbfx.set_dropped(full, drop)
model.zero_grad(set_to_none=True); ref.zero_grad(set_to_none=True)
for n in drop:
    for p in ref.get_submodule(n).parameters(): p.requires_grad_(False)
model(**b).loss.backward(); ref(**b).loss.backward()
print("dropped dW None:", [model.get_submodule(n).weight.grad is None for n in drop], "grads vs freezing:", close(grads(model), grads(ref)))
for n in drop:
    for p in ref.get_submodule(n).parameters(): p.requires_grad_(True)
ldbfx.set_dropped(full, [])
ldbfx.set_dropped_branches(full, ["model.layers.2.mlp", "model.layers.1.self_attn"])
model.zero_grad(set_to_none=True); ref.zero_grad(set_to_none=True)
h1 = ref.model.layers[2].mlp.register_forward_hook(lambda m, i, o: o.detach())
h2 = ref.model.layers[1].self_attn.register_forward_hook(lambda m, i, o: (o[0].detach(), o[1]))
model(**b).loss.backward(); ref(**b).loss.backward(); h1.remove(); h2.remove()
print("branch drop vs detach:", close(grads(model), grads(ref)), "skip record:", sorted(full.ldbfx_state.skipped))
