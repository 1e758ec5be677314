"""(c) with activation checkpointing: checkpoint_wrapper / torch.utils.checkpoint around the block, HF's
gradient_checkpointing_enable. Checked by the bytes saved for backward and by exact gradients."""
import copy, functools, warnings, logging, torch, ldbfx
from torch.utils.checkpoint import checkpoint
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper, apply_activation_checkpointing
from common import tiny_llama, batch, grads, close
from blockwise import install_blocks
warnings.filterwarnings("ignore"); logging.getLogger("torch._export").setLevel(logging.ERROR)
b = batch(t=64)

def saved_bytes(model):
    total = [0]
    def pack(t):
        total[0] += t.numel() * t.element_size(); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**b).loss
    return loss, total[0]

drop = ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
def reference():
    ref = tiny_llama(4)
    for n in drop:
        for p in ref.get_submodule(n).parameters(): p.requires_grad_(False)
    loss, by = saved_bytes(ref); loss.backward()
    return grads(ref), by

gref, by_plain = reference()
print("plain model saved bytes:", by_plain)

# A) per-block, no checkpointing
model = tiny_llama(4); bw = install_blocks(model, b); bw.set_dropped(drop)
loss, by = saved_bytes(model); loss.backward()
print("A per-block, no ckpt: saved", by, "grads ok:", close(grads(model), gref) == [])

# B) HF gradient checkpointing enabled AFTER per-block install (the class-level forward wrapper is bypassed)
model = tiny_llama(4); bw = install_blocks(model, b); bw.set_dropped(drop)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
loss, by = saved_bytes(model); loss.backward()
print("B HF ckpt over installed forward: saved", by, "(checkpointing", "ON)" if by < 0.6 * by_plain else "silently OFF)",
      "grads ok:", close(grads(model), gref) == [])

# C) the same, with the installed forward doing what HF's forward_with_checkpointing does
from blockwise_ckpt import hf_checkpointing_aware
model = tiny_llama(4); bw = install_blocks(model, b); bw.set_dropped(drop)
for block in bw.blocks.values(): hf_checkpointing_aware(block)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
loss, by = saved_bytes(model); loss.backward()
print("C HF ckpt, ckpt-aware install: saved", by, "grads ok:", close(grads(model), gref) == [])
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
model.zero_grad(set_to_none=True)
loss, by = saved_bytes(model); loss.backward()
print("C' HF ckpt reentrant: saved", by, "grads ok:", close(grads(model), gref))

# D) torch's checkpoint_wrapper around each block (apply_activation_checkpointing), after install
model = tiny_llama(4); bw = install_blocks(model, b); bw.set_dropped(drop)
apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                               check_fn=lambda m: m in set(bw.blocks.values()))
print("wrapped:", type(model.model.layers[1]).__name__)
loss, by = saved_bytes(model); loss.backward()
print("D checkpoint_wrapper: saved", by, "grads ok:", close(grads(model), gref) == [])

# E) torch.utils.checkpoint.checkpoint(block, ...) called directly
model = tiny_llama(4); bw = install_blocks(model, b); bw.set_dropped(drop)
blk = model.model.layers[1]
x = torch.randn(2, 64, 32, requires_grad=True)
cos, sin = model.model.rotary_emb(x, torch.arange(64)[None])
kw = dict(attention_mask=None, position_embeddings=(cos, sin), position_ids=torch.arange(64)[None], cache=None, use_cache=False)
y = checkpoint(blk, x, use_reentrant=False, **kw); y.sum().backward()
print("E checkpoint(block): q_proj dW None:", blk.self_attn.q_proj.weight.grad is None,
      "k_proj dW set:", blk.self_attn.k_proj.weight.grad is not None)

# F) HF checkpointing (ckpt-aware install) + branch drop: equals detaching the branch
model = tiny_llama(4); bw = install_blocks(model, b)
for block in bw.blocks.values(): hf_checkpointing_aware(block)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}); model.train()
bw.set_dropped_branches(["model.layers.2.mlp"])
ref = tiny_llama(4); h = ref.model.layers[2].mlp.register_forward_hook(lambda m, i, o: o.detach())
loss, by = saved_bytes(model); loss.backward(); ref(**b).loss.backward(); h.remove()
print("F HF ckpt + branch drop: saved", by, "grads vs detach:", close(grads(model), grads(ref)) == [])
