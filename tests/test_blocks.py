"""Per-block install (``ldbfx.install(model, gm, blocks=...)``): the model keeps its module
boundaries, each block runs its own rewritten graph. Exactness against the untransformed model
(nothing dropped), freezing (layers dropped) and detaching (branches dropped); hooks; activation
checkpointing the ways users turn it on; regional compilation with more blocks than Dynamo's
recompile limit. FSDP2 per block: tests/test_blocks_distributed.py."""

import copy
import random

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import ldbfx
from contract import assert_close_to_scale, saved_bytes
from ldbfx.integrations.blocks import block_graphs


class Block(nn.Module):
    """A pre-norm residual block with a layer scale between the branch and its add."""

    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.scale = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        return x + self.scale * self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, blocks=4, width=16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def net(blocks=4):
    torch.manual_seed(0)
    return Net(blocks)


def x_batch():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_grads(got, want, zeros_as_none=()):
    """``zeros_as_none``: parameters whose compiled backward gives zeros where eager gives None."""
    assert got.keys() == want.keys()
    for name in got:
        g, w = got[name], want[name]
        if name in zeros_as_none and g is not None:
            assert not g.any(), name
            g = None
        assert (g is None) == (w is None), name
        if g is not None:
            # Another kernel order (the graph's ops vs the module's code): the tensor's scale.
            assert_close_to_scale(g, w, what=name)


def params_of(gm, layer_names):
    return {p for layer in ldbfx.layers(gm) if layer.name in layer_names for p in layer.params}


def freeze(model, names):
    for name in names:
        model.get_parameter(name).requires_grad_(False)


def test_fx_blocks_nothing_dropped_layers_and_branches():
    model, ref = net(), net()
    gm = ldbfx.transform(model, keep_first=1)
    assert ldbfx.install(model, gm, blocks=Block) is model
    assert ldbfx.installed(model) is gm and len(block_graphs(model)) == 4
    x = x_batch()
    model(x).sum().backward()
    ref(x).sum().backward()
    assert_grads(grads(model), grads(ref))

    # Layers dropped: equal to freezing them.
    model.zero_grad(), ref.zero_grad()
    drop = ["blocks.1.fc1", "blocks.2.norm"]
    ldbfx.set_dropped(gm, drop)
    model(x).sum().backward()
    freeze(ref, params_of(gm, drop))
    ref(x).sum().backward()
    assert_grads(grads(model), grads(ref))
    assert model.blocks[1].fc1.weight.grad is None

    # A branch dropped: equal to detaching the block's residual branch (layer scale included).
    ldbfx.set_dropped(gm, [])
    model.zero_grad()
    ref = net()
    ldbfx.set_dropped_branches(gm, ["blocks.2"])
    model(x).sum().backward()
    block = ref.blocks[2]
    block.forward = lambda h, b=block: h + (b.scale * b.fc2(torch.relu(b.fc1(b.norm(h))))).detach()
    ref(x).sum().backward()
    assert_grads(grads(model), grads(ref))
    assert all(p.grad is None for p in model.blocks[2].parameters())


def test_layers_outside_blocks_always_train_and_uninstall_restores():
    model = net()
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    assert ldbfx.layers(gm)[0].eligible  # "inp", in the whole graph
    ldbfx.install(model, gm, blocks=Block)
    layers = {layer.name: layer for layer in ldbfx.layers(gm)}
    assert not layers["inp"].eligible and not layers["out"].eligible
    assert "outside the blocks" in layers["inp"].reason
    with pytest.raises(ldbfx.LayerNotFoundError, match="outside the blocks"):
        ldbfx.set_dropped(gm, ["out"])
    ldbfx.set_dropped(gm, ["blocks.0.fc2"])
    ldbfx.uninstall(model)
    assert ldbfx.installed(model) is None
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert ldbfx.layers(gm)[0].eligible and ldbfx.dropped(gm) == ("blocks.0.fc2",)


def test_hooks_on_blocks_run():
    model = net()
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    # A forward hook that changes the block's output: the model computes with the change.
    model.blocks[1].register_forward_hook(lambda m, args, out: out * 0)
    model.blocks[2].register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    model(x_batch()).sum().backward()
    assert calls == ["pre", "backward"]
    assert model.blocks[0].fc1.weight.grad.abs().sum() == 0  # nothing flows back through block 1


def test_optimizer_leaves_dropped_layers_untouched():
    model = net()
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(x_batch()).sum().backward()
    opt.step(), opt.zero_grad()
    ldbfx.set_dropped_branches(gm, ["blocks.1"])
    before = {n: p.detach().clone() for n, p in model.blocks[1].named_parameters()}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.blocks[1].named_parameters()}
    model(x_batch()).sum().backward()
    opt.step()
    for n, p in model.blocks[1].named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(opt.state[p]["exp_avg"], moments[n]), n


def test_regional_compile_one_graph_for_any_mask_past_the_recompile_limit():
    """``block.compile()`` on 10 identical blocks (the recompile limit is 8): one graph serves
    every block and every layer mask; the first branch drop splits it once (the gate regions)."""
    torch._dynamo.reset()
    model, ref = net(10), net(10)
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    counter = CompileCounterWithBackend("aot_eager")
    for block in model.blocks:
        block.compile(backend=counter)
    x = x_batch()
    eligible = [layer.name for layer in ldbfx.layers(gm) if layer.eligible]
    rng = random.Random(0)
    for step in range(4):
        ldbfx.set_dropped(gm, rng.sample(eligible, 6) if step else [])
        model.zero_grad()
        model(x).sum().backward()
    assert counter.frame_count == 1
    drop = rng.sample(eligible, 6)
    ldbfx.set_dropped(gm, drop)
    model.zero_grad()
    model(x).sum().backward()
    freeze(ref, params_of(gm, drop))
    ref(x).sum().backward()
    assert_grads(grads(model), grads(ref), zeros_as_none=params_of(gm, drop))

    branches = [b.name for b in ldbfx.branches(gm) if b.eligible]
    frames = counter.frame_count
    for step in range(3):
        ldbfx.set_dropped(gm, [])
        ldbfx.set_dropped_branches(gm, rng.sample(branches, 3))
        model(x).sum().backward()
    split = counter.frame_count - frames  # the first drop: one split graph, shared by all blocks
    assert 0 < split <= 3
    assert not any("recompile_limit" in str(k) for k in torch._dynamo.utils.counters["stats"])


def test_checkpoint_wrapper_and_torch_checkpoint_save_what_the_original_saves():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model, ref = net(), net()
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    for m in (model, ref):
        apply_activation_checkpointing(m, check_fn=lambda module: isinstance(module, Block))
    x = x_batch()
    ldbfx.set_dropped_branches(gm, ["blocks.2"])
    out = {}
    assert saved_bytes(lambda: out.setdefault("m", model(x))) == saved_bytes(lambda: out.setdefault("r", ref(x)))
    out["m"].sum().backward()
    assert all(p.grad is None for p in model.blocks[2].parameters())
    assert model.blocks[1].fc1.weight.grad is not None

    # torch.utils.checkpoint around a block, as a forward writes it.
    model, ref = net(), net()
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)

    def checkpointed(m, h):
        h = m.inp(h)
        for block in m.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return m.out(h)

    plain = saved_bytes(lambda: ref(x))
    mine, theirs = {}, {}
    got = saved_bytes(lambda: mine.setdefault("out", checkpointed(model, x)))
    assert got == saved_bytes(lambda: theirs.setdefault("out", checkpointed(ref, x))) < plain
    mine["out"].sum().backward(), theirs["out"].sum().backward()
    assert_grads(grads(model), grads(ref))


@pytest.mark.parametrize("order", ["checkpoint-then-compile", "compile-then-checkpoint"])
def test_compiled_checkpointed_blocks_with_layer_and_branch_drop(order):
    """Checkpointing and per-block compile together, in both orders: layer drops compile one
    graph for all blocks either way. A branch drop splits a block's compiled graph at its gates,
    which a checkpoint region inside the compiled one cannot hold: with the checkpoint inside
    (torchtitan's order) Dynamo runs those blocks eagerly, with it outside they stay compiled.
    The gradients are the detaching reference's in both."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    torch._dynamo.reset()
    model, ref = net(10), net(10)
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    counter = CompileCounterWithBackend("aot_eager")
    if order == "checkpoint-then-compile":
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))
    for block in model.blocks:
        block.compile(backend=counter)
    if order == "compile-then-checkpoint":
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))
    x = x_batch()
    for step in range(3):
        ldbfx.set_dropped(gm, ["blocks.3.fc1", "blocks.5.norm"] if step else [])
        model(x).sum().backward()
    assert counter.frame_count == 1
    model.zero_grad()
    ldbfx.set_dropped(gm, [])
    ldbfx.set_dropped_branches(gm, ["blocks.1"])
    x = x_batch()
    model(x).sum().backward()
    block = ref.blocks[1]
    block.forward = lambda h, b=block: h + (b.scale * b.fc2(torch.relu(b.fc1(b.norm(h))))).detach()
    ref(x).sum().backward()
    got = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads(model).items()}
    compiled = order == "compile-then-checkpoint"
    assert_grads(got, grads(ref), zeros_as_none={f"blocks.1.{n}" for n, _ in block.named_parameters()} if compiled else ())
    assert (counter.frame_count > 1) == compiled


def test_install_refuses_blocks_it_cannot_find_or_serve():
    model = net()
    gm = ldbfx.transform(model)
    with pytest.raises(ldbfx.LdbfxError, match="_no_split_modules"):
        ldbfx.install(model, gm, blocks="auto")
    with pytest.raises(ldbfx.LdbfxError, match="does not have"):
        ldbfx.install(model, gm, blocks=["blocks.9"])
    with pytest.raises(ldbfx.LdbfxError, match="no module"):
        ldbfx.install(model, gm, blocks=nn.Conv2d)
    assert ldbfx.installed(model) is None


def test_set_dropped_on_a_copy_of_the_masks_reaches_every_block():
    model = net()
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.set_dropped(gm, ["blocks.3.fc1"])  # before install: the blocks take the mask
    ldbfx.install(model, gm, blocks=Block)
    model(x_batch()).sum().backward()
    assert model.blocks[3].fc1.weight.grad is None and model.blocks[2].fc1.weight.grad is not None
    assert gm.ldbfx_state.skipped_globally() == {gm.ldbfx_capture.layer_index["blocks.3.fc1"]}
    policy = ldbfx.DropBP(gm, drop_rate=0.5, seed=0)  # policies take gm as for the whole graph
    policy.start_epoch(0)
    for _ in range(3):
        model.zero_grad()
        model(x_batch()).sum().backward()
        dropped = set(ldbfx.dropped_branches(gm))
        for index, block in enumerate(model.blocks):
            assert (block.fc1.weight.grad is None) == (f"blocks.{index}" in dropped or index == 3)
        policy.step()


class ConstantBlock(Block):
    """A block whose forward makes a tensor constant (the graph keeps it beside the block's buffers)."""

    def forward(self, x):
        return super().forward(x) + torch.tensor([0.5] * 16)


def test_block_graph_keeps_its_constants():
    torch.manual_seed(0)
    model = Net()
    model.blocks = nn.ModuleList(ConstantBlock() for _ in range(4))
    ref = copy.deepcopy(model)
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=ConstantBlock)
    x = x_batch()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


def test_uninstall_keeps_the_models_forward_and_what_the_blocks_skipped():
    model = net()
    own = model.forward
    model.forward = lambda x: own(x)  # an instance forward set before the install
    mine = model.__dict__["forward"]
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ldbfx.set_dropped(gm, ["blocks.1.fc1"])
    model(x_batch()).sum().backward()
    before = model.blocks[1].fc1.weight.detach().clone()
    model.blocks[1].fc1.weight.grad = torch.ones_like(before)  # a stray gradient: the step must skip it
    ldbfx.uninstall(model)  # between backward and step
    assert model.__dict__["forward"] is mine
    opt.step()
    assert torch.equal(model.blocks[1].fc1.weight, before)


class Shared(nn.Module):
    """One block called twice per forward (ALBERT's weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(8, 16), Block(), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.block(self.block(self.inp(x))))


def test_refusals_per_block():
    model = Shared()
    gm = ldbfx.transform(model, keep_first=1, keep_first_blocks=0, keep_last_blocks=0)
    with pytest.raises(ldbfx.LdbfxError, match="more than once per forward"):
        ldbfx.install(model, gm, blocks=Block)
    model = net()
    gm = ldbfx.transform(model, keep_first=1)
    ldbfx.install(model, gm, blocks=Block)
    with pytest.raises(ldbfx.LdbfxError, match="per-block install"):
        ldbfx.LearnAndDrop(gm, warmup_epochs=1)
    with pytest.raises(ldbfx.LdbfxError, match="per-block install"):
        ldbfx.set_frozen_rows(gm, {"blocks.1.fc1": [0]})
