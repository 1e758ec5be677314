"""(a) keep the hierarchy from ONE export: torch.export(preserve_module_call_signature=blocks) + unflatten.
Does each decoder block come back as a submodule graph with the block's own call signature, which
could be rewritten and installed as the ORIGINAL block's forward?"""
import time, warnings, logging, torch
from torch.export import export, unflatten
from common import tiny_llama, batch
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
m = tiny_llama(4); b = batch(); m.train()
blocks = tuple(f"model.layers.{i}" for i in range(4))
t = time.perf_counter()
ep = export(m, (), b, strict=False, preserve_module_call_signature=blocks)
print("export s", round(time.perf_counter() - t, 2))
t = time.perf_counter()
u = unflatten(ep)
print("unflatten s", round(time.perf_counter() - t, 2))
blk = u.get_submodule("model.layers.1")
print(type(blk).__name__, "params are the model's objects:",
      blk.get_submodule("self_attn.q_proj").weight is m.model.layers[1].self_attn.q_proj.weight)
print(blk.graph.python_code("self").src[:1800])
codes = {u.get_submodule(n).graph.python_code("self").src for n in blocks}
print("distinct block codes:", len(codes))
out = u(**b)
print("unflattened runs; loss equal:", torch.allclose(out.loss if hasattr(out, "loss") else out[0], m(**b).loss))
w_u = blk.get_submodule("self_attn.q_proj").weight; w_m = m.model.layers[1].self_attn.q_proj.weight
print("unflatten param: same storage:", w_u.data_ptr() == w_m.data_ptr(), "type", type(w_u).__name__)
root = u.get_submodule("model")
print("root graph calls blocks as:", [(n.op, n.target) for n in root.graph.nodes if n.op == "call_module"][:8])
