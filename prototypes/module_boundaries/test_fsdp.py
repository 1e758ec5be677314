"""(c) under FSDP2 per block (1 rank, gloo, CPU), and the flat graph under the same wrapping."""
import copy, os, sys, warnings, torch, ldbfx
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from common import tiny_llama, batch, close
from blockwise import install_blocks
warnings.filterwarnings("ignore")
import logging; logging.getLogger("torch._export").setLevel(logging.ERROR)

dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:29511")
mesh = init_device_mesh("cpu", (1,))
b = batch()

def full_grads(m):
    return {n: None if p.grad is None else (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in m.named_parameters()}

# --- flat graph + install on the root, FSDP2 per block: the failure the issue describes
model = tiny_llama(4)
gm = ldbfx.transform(model, example_kwargs=b)
ldbfx.install(model, gm)
for layer in model.model.layers: fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
try:
    model(**b).loss.backward(); print("flat + FSDP2 per block: ran (unexpected)")
except Exception as e:
    print("flat + FSDP2 per block fails:", type(e).__name__, str(e).splitlines()[0][:200])

# --- (c): per-block graphs installed as each block's forward, then FSDP2 per block + root
model = tiny_llama(4)
ref = copy.deepcopy(model)
bw = install_blocks(model, b)
calls = []
for name, layer in bw.blocks.items():
    layer.register_forward_pre_hook(lambda m, a, k, name=name: calls.append(
        (name, type(m.self_attn.q_proj.weight).__name__)), with_kwargs=True)  # user hook, after install
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
print("param type after fully_shard:", type(model.model.layers[1].self_attn.q_proj.weight).__name__)
drop = ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.up_proj"]
bw.set_dropped(drop)
bw.set_dropped_branches(["model.layers.2.self_attn"])
loss = model(**b).loss
loss.backward()
print("user pre-hooks fired per block (name, param type seen by the hook, which runs before FSDP's? ):", calls)
for n in drop:
    for p in ref.get_submodule(n).parameters(): p.requires_grad_(False)
h = ref.model.layers[2].self_attn.register_forward_hook(lambda m, i, o: (o[0].detach(), o[1]))
lr = ref(**b).loss; lr.backward(); h.remove()
print("loss equal:", loss.item(), lr.item())
g = full_grads(model)
print("dropped grads None:", [g[n + ".weight"] is None for n in drop])
print("FSDP2 grads vs freezing+detach reference:", close(g, full_grads(ref)))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
before = model.model.layers[1].self_attn.q_proj.weight.full_tensor().clone()
opt.step()
print("dropped sharded param untouched by optimizer:", torch.equal(before, model.model.layers[1].self_attn.q_proj.weight.full_tensor()))
dist.destroy_process_group()
