import torch
from transformers import LlamaConfig, LlamaForCausalLM

def tiny_llama(layers=4, hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64, use_cache=False,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)

def batch(b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}

def grads(model):
    return {n.replace("._checkpoint_wrapped_module", ""): (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}

def close(a, b, tol=1e-4):
    bad = []
    for n in a:
        if (a[n] is None) != (b[n] is None):
            bad.append((n, "None mismatch", a[n] is None, b[n] is None)); continue
        if a[n] is None: continue
        scale = max(a[n].abs().max().item(), b[n].abs().max().item(), 1e-12)
        err = (a[n] - b[n]).abs().max().item()
        if err > tol * scale:
            bad.append((n, err, scale))
    return bad
