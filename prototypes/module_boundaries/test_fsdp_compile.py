"""(c) + FSDP2 per block + block.compile(), 1 rank gloo CPU: gradients vs the freezing reference, graphs compiled."""
import copy, warnings, logging, torch, ldbfx
import torch.distributed as dist, torch._dynamo.utils as du
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from common import tiny_llama, batch, close
from blockwise import install_blocks
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
torch._dynamo.config.recompile_limit = 64
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:29512")
mesh = init_device_mesh("cpu", (1,))
b = batch()
model = tiny_llama(4); ref = copy.deepcopy(model)
bw = install_blocks(model, b)
for blk in bw.blocks.values():
    fully_shard(blk, mesh=mesh); blk.compile()
fully_shard(model, mesh=mesh)
drop = ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.up_proj"]
for step in range(3):
    bw.set_dropped(drop if step else [])
    model.zero_grad(set_to_none=True)
    model(**b).loss.backward()
for n in drop:
    for p in ref.get_submodule(n).parameters(): p.requires_grad_(False)
ref(**b).loss.backward()
g = {n: None if p.grad is None else (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
gr = {n: p.grad for n, p in ref.named_parameters()}
print("FSDP2+block.compile: grads vs freezing (compiled: dropped get zeros, set to None by the optimizer hook):",
      close({k: (None if v is None or (k.split('.weight')[0] in drop) else v) for k, v in g.items()},
            {k: v for k, v in gr.items()}))
print("dropped dW all zero:", [bool((g[n + '.weight'] == 0).all()) for n in drop])
print("unique graphs:", du.counters["stats"]["unique_graphs"], "graph breaks:", sum(du.counters["graph_break"].values()))
print({k[:120]: v for k, v in du.counters["graph_break"].items()})
dist.destroy_process_group()
