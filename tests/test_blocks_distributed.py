"""FSDP2 per block plus root, the way torchtitan and accelerate shard a model, on a per-block
install: 2 gloo ranks on loopback, CPU. Each variant's reference is the untransformed model under
the same sharding and mixed precision (frozen where layers are dropped, detached where branches
are); the peak of unsharded parameters is the reference's: one block's plus the root's."""

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

import ldbfx
from contract import assert_close_to_scale
from test_blocks import Block, net
from test_distributed import _spawn

BATCH = 8


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _unsharded_numel(model):
    from torch.distributed.tensor import DTensor

    return sum(p.numel() for m in model.modules() for p in m._parameters.values()
               if p is not None and not isinstance(p, DTensor))


def _shard(model, blocks, mp, compile_counter, checkpoint):
    """Per block: compile, checkpoint (the compiled block: a branch drop's gates stay compiled),
    shard; then the root."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else MixedPrecisionPolicy()
    peak = [0]
    for parent, name, block in blocks:
        if compile_counter is not None:
            block.compile(backend=compile_counter)
        if checkpoint:
            block = checkpoint_wrapper(block)
            parent.register_module(name, block)
        fully_shard(block, mp_policy=policy)
        # After FSDP2's own pre-hook (registered first): the unsharded parameters at this block.
        block.register_forward_pre_hook(lambda m, args: peak.__setitem__(0, max(peak[0], _unsharded_numel(model))))
    fully_shard(model, mp_policy=policy)
    return peak


def _blocks_of(model, kind):
    if kind == "fx":
        return [(model.blocks, str(i), b) for i, b in enumerate(model.blocks)]
    return [(model.model.layers, str(i), b) for i, b in enumerate(model.model.layers)]


def _full_grads(model):
    return {n.replace("._checkpoint_wrapped_module", ""): None if p.grad is None else p.grad.full_tensor().float()
            for n, p in model.named_parameters()}


def _make(kind):
    if kind == "fx":
        model = net()
        x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(1))
        return model, (x,), {}, (lambda out: out.float().pow(2).mean())
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (BATCH, 12), generator=torch.Generator().manual_seed(1))
    return model, (), {"input_ids": ids, "labels": ids}, (lambda out: out.loss)


def _rank(rank, world, init_file, out_dir, kind, variants):
    _init(rank, world, init_file)
    results = {}
    for variant in variants:
        mp, compiled, checkpoint = "bf16" in variant, "compile" in variant, "ckpt" in variant
        torch._dynamo.reset()
        model, args, kwargs, loss_of = _make(kind)
        layer_drop = ["blocks.1.fc1", "blocks.2.norm"] if kind == "fx" else ["model.layers.1.mlp.up_proj"]
        branch_drop = ["blocks.2"] if kind == "fx" else ["model.layers.1.self_attn"]
        references = {what: copy.deepcopy(model) for what in ("none", "layers", "branches")}
        if kind == "fx":  # torch.fx: no example batch; the graphs follow the parameters' dtype
            gm = ldbfx.transform(model, keep_first=1)
            ldbfx.install(model, gm, blocks=Block)
        else:  # torch.export: the blocks are captured in the dtype FSDP2 computes in
            gm = ldbfx.transform(model, example_kwargs=kwargs)
            ldbfx.install(model, gm, blocks="auto", example_kwargs=kwargs, param_dtype=torch.bfloat16 if mp else None)
        drop_params = {p for layer in ldbfx.layers(gm) if layer.name in layer_drop for p in layer.params}
        for name in drop_params:
            references["layers"].get_parameter(name).requires_grad_(False)
        for name in branch_drop:
            branch = references["branches"].get_submodule(name)
            if kind == "fx":  # the block's residual branch (layer scale included), not its output
                branch.forward = lambda h, b=branch: h + (b.scale * b.fc2(torch.relu(b.fc1(b.norm(h))))).detach()
            else:
                branch.register_forward_hook(lambda m, a, out: (out[0].detach(), *out[1:]))
        counter = CompileCounterWithBackend("aot_eager") if compiled else None
        peak = _shard(model, _blocks_of(model, kind), mp, counter, checkpoint)
        peaks = {what: _shard(ref, _blocks_of(ref, kind), mp, None, checkpoint) for what, ref in references.items()}
        shard = BATCH // world
        args = tuple(a[rank * shard:(rank + 1) * shard] for a in args)
        kwargs = {k: v[rank * shard:(rank + 1) * shard] for k, v in kwargs.items()}
        got = {}
        for what, (layers, branches) in {"none": ([], []), "layers": (layer_drop, []),
                                         "branches": ([], branch_drop)}.items():
            ldbfx.set_dropped(gm, layers)
            ldbfx.set_dropped_branches(gm, branches)
            model.zero_grad(set_to_none=True)
            loss_of(model(*args, **kwargs)).backward()
            loss_of(references[what](*args, **kwargs)).backward()
            got[what] = (_full_grads(model), _full_grads(references[what]))
        # A step: the dropped layers' shards stay as they were (compiled: their zero gradients
        # are set to None by the optimizer hook), the others move.
        shards = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
        ldbfx.set_dropped(gm, layer_drop)
        ldbfx.set_dropped_branches(gm, [])
        ldbfx.discard_skipped(gm)  # the scenarios above threw their gradients away: no step for them
        model.zero_grad(set_to_none=True)
        loss_of(model(*args, **kwargs)).backward()
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1).step()
        unchanged = {n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters()
                     if torch.equal(p.detach().to_local(), shards[n])}
        results[variant] = {"grads": got, "unchanged": unchanged, "peak": peak[0], "reference_peak": peaks["none"][0],
                            "total": sum(p.numel() for p in model.parameters()) * world,
                            "frames": counter.frame_count if counter else None, "dropped": drop_params}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def _check(results, kind):
    for variant, result in results.items():
        # bf16 (mixed precision): both runs round the same ops to bf16, but the graph's ATen ops
        # may order a sum differently from the module's code: a few bf16 ulps of the scale.
        rel = 3e-2 if "bf16" in variant else 1e-4
        for what, (got, want) in result["grads"].items():
            assert got.keys() == want.keys()
            for name in got:
                g, w = got[name], want[name]
                if g is not None and w is None and "compile" in variant:
                    assert not g.any(), (variant, what, name)  # compiled: zeros, cleared by the optimizer hook
                    continue
                assert (g is None) == (w is None), (variant, what, name)
                if g is not None:
                    assert_close_to_scale(g, w, rel=rel, what=f"{variant} {what} {name}")
        assert result["unchanged"] == result["dropped"], variant
        # One block's parameters plus the root's are unsharded at a time, as for the original.
        assert result["peak"] == result["reference_peak"] < result["total"] / 2, variant
        if "compile" in variant:  # one graph for the blocks, the gate regions once branches drop
            assert result["frames"] > 1, variant


@pytest.mark.parametrize(("kind", "variants"), [
    ("fx", ("eager", "eager-bf16", "compile", "compile-ckpt-bf16")),
    ("llama", ("eager-bf16", "compile-ckpt")),
])
def test_fsdp2_per_block_and_root(tmp_path, kind, variants):
    if kind == "llama":
        pytest.importorskip("transformers")
    _spawn(_rank, 2, str(tmp_path / "init"), str(tmp_path), kind, variants)
    _check(torch.load(tmp_path / "results.pt", weights_only=False), kind)
