"""Branch drop (DropBP without model edits): discovery, detached-reference semantics, compile, policy.

The semantic reference of a dropped branch is the original model with that branch's output
detached before the add (a forward hook returning ``output.detach()``, or the custom models'
``detach`` flag). Eager ldbfx runs the same kernels, so eager gradients are compared bit for bit;
compiled ones within a tolerance on the gradient's scale (other kernels).
"""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import ldbfx
from contract import assert_close_to_scale, backward_flops, grads, loss_of


# ---------------------------------------------------------------------------------------------
# Custom models: a projection shortcut, a gated branch, a detach flag for the reference.
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm MLP block; ``gated`` scales the branch by a learned gate; ``project`` puts a
    linear on the shortcut (a projection shortcut with fewer layers than the branch)."""

    def __init__(self, dim=16, gated=False, project=False):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gate = nn.Parameter(torch.full((dim,), 0.5)) if gated else None
        self.proj = nn.Linear(dim, dim) if project else None
        self.detach = False

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(self.norm(x))))
        if self.gate is not None:
            h = torch.sigmoid(self.gate) * h
        if self.detach:
            h = h.detach()
        shortcut = self.proj(x) if self.proj is not None else x
        return shortcut + h


class Net(nn.Module):
    def __init__(self, depth=6):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[Block(gated=i == 2, project=i == 3) for i in range(depth)])
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def _reference(model, dropped):
    ref = copy.deepcopy(model)
    for i, block in enumerate(ref.blocks):
        block.detach = i in dropped
    return ref


def _assert_grads_equal(got, want, exact=True):
    assert {n for n, g in got.items() if g is None} == {n for n, g in want.items() if g is None}
    for name, g in got.items():
        if g is not None:
            if exact:
                assert torch.equal(g, want[name]), name
            else:
                assert_close_to_scale(g, want[name], rel=2e-3, what=name)


def test_custom_model_branches_projection_and_gate():
    gm = ldbfx.transform(Net())
    records = ldbfx.branches(gm)
    assert [b.name for b in records] == [f"blocks.{i}" for i in range(6)]
    assert records[2].layers == ("blocks.2.norm", "blocks.2.fc1", "blocks.2.fc2", "blocks.2")  # the gate
    assert records[3].skip_layers == ("blocks.3.proj",) and "blocks.3.proj" not in records[3].layers
    assert [b.eligible for b in records] == [False, True, True, True, True, False]
    assert records[0].reason == "first block" and records[-1].reason == "last block"
    assert all(b.index == i for i, b in enumerate(records))


@pytest.mark.parametrize("dropped", [(1,), (2, 3), (1, 2, 3, 4)])
def test_gradients_equal_the_detached_reference(dropped):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    ref = _reference(model, dropped)
    gm = ldbfx.transform(model)
    ldbfx.set_dropped_branches(gm, [f"blocks.{i}" for i in dropped])
    assert ldbfx.dropped_branches(gm) == tuple(f"blocks.{i}" for i in dropped)
    out = gm(x)
    assert torch.equal(out, ref(x))  # forward unchanged
    loss_of(out).backward()
    loss_of(ref(x)).backward()
    _assert_grads_equal(grads(model), grads(ref))
    for i in dropped:
        block = model.blocks[i]
        shortcut = set(block.proj.parameters()) if block.proj is not None else set()
        assert all(p.grad is None for p in block.parameters() if p not in shortcut)
        assert all(p.grad is not None for p in shortcut)


def test_flops_and_saved_activations_equal_the_detached_reference():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    dropped = (1, 2)
    ref = _reference(model, dropped)
    gm = ldbfx.transform(model)
    full = backward_flops(lambda: loss_of(gm(x)))
    ldbfx.set_dropped_branches(gm, [1, 2])
    ours = backward_flops(lambda: loss_of(gm(x)))
    assert ours == backward_flops(lambda: loss_of(ref(x))) < full
    # What autograd still holds once the forward has returned: no more than the reference holds
    # (a dropped branch that runs alone up to its gate runs without autograd and saves nothing;
    # the reference's detached branch may keep a node alive), less than a full backward holds.
    assert _alive_saved_bytes(gm, x) <= _alive_saved_bytes(ref, x) < _alive_saved_bytes(model, x)


def _alive_saved_bytes(module, x):
    import gc
    import weakref

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
        loss = loss_of(module(x))
    gc.collect()
    alive = {id(t): t for t in (r() for r in saved) if t is not None}
    del loss
    return sum(t.numel() * t.element_size() for t in alive.values())


def test_optimizer_leaves_dropped_branches_and_their_state_untouched():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    gm = ldbfx.transform(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    loss_of(gm(x)).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # zeros, not None: the optimizer hook must still skip
    block = model.blocks[2]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in block.named_parameters()}
    kept = model.blocks[1].fc1.weight.detach().clone()
    ldbfx.set_dropped_branches(gm, ["blocks.2"])
    loss_of(gm(x)).backward()
    opt.step()
    assert not torch.equal(model.blocks[1].fc1.weight, kept)  # a kept branch trains
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n]), n
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[n]), n
    ldbfx.set_dropped_branches(gm, [])
    loss_of(gm(x)).backward()
    opt.step()
    assert not torch.equal(block.fc1.weight, before["fc1.weight"])  # and the branch again, once kept


def test_branch_drop_combines_with_layer_drop():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    ref = _reference(model, (3,))
    gm = ldbfx.transform(model)
    ldbfx.set_dropped_branches(gm, ["blocks.3"])
    ldbfx.set_dropped(gm, ["blocks.1.fc1"])
    ref.blocks[1].fc1.requires_grad_(False)
    loss_of(gm(x)).backward()
    loss_of(ref(x)).backward()
    _assert_grads_equal(grads(model), grads(ref))


def test_dense_mode_gives_dropped_branches_zero_gradients():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    ref = _reference(model, (2,))
    gm = ldbfx.transform(model)
    ldbfx.distributed.dense_gradients(gm)
    ldbfx.set_dropped_branches(gm, [2])
    loss_of(gm(x)).backward()
    loss_of(ref(x)).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:  # the detached branch: zeros, as DDP's reducer needs
            assert p.grad is not None and not p.grad.any(), name
        else:
            assert torch.equal(p.grad, q.grad), name


def test_deepcopy_has_its_own_branch_mask():
    gm = ldbfx.transform(Net())
    ldbfx.set_dropped_branches(gm, [1])
    twin = copy.deepcopy(gm)
    ldbfx.set_dropped_branches(twin, [2, 3])
    assert ldbfx.dropped_branches(gm) == ("blocks.1",)
    assert ldbfx.dropped_branches(twin) == ("blocks.2", "blocks.3")
    loss_of(twin(torch.randn(2, 8))).backward()
    assert all(p.grad is None for p in twin.blocks[2].parameters())
    assert all(p.grad is None for p in gm.blocks[2].parameters())  # nothing ran on gm


def test_bad_branch_names_and_models_without_residuals():
    gm = ldbfx.transform(Net())
    with pytest.raises(ldbfx.BranchNotFoundError, match="Eligible branches are: blocks.1, blocks.2"):
        ldbfx.set_dropped_branches(gm, ["nope"])
    with pytest.raises(ldbfx.BranchNotFoundError, match="first block"):
        ldbfx.set_dropped_branches(gm, [0])
    plain = ldbfx.transform(nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)]))
    assert ldbfx.branches(plain) == ()
    with pytest.raises(ldbfx.BranchNotFoundError, match="no residual add"):
        ldbfx.set_dropped_branches(plain, [0])
    with pytest.raises(ValueError, match="no residual add"):
        ldbfx.DropBP(plain)


def test_filters_and_keep_rules_choose_eligible_branches():
    gm = ldbfx.transform(Net(), keep_first_blocks=2, keep_last_blocks=0,
                         branch_filter=lambda b: b.name != "blocks.4")
    assert [(b.name, b.reason) for b in ldbfx.branches(gm) if not b.eligible] == [
        ("blocks.0", "first 2 blocks"), ("blocks.1", "first 2 blocks"), ("blocks.4", "filter")]


class NotResidual(nn.Module):
    """Adds that are not residuals: a parameter table, two equal parallel branches, a shape."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(8))
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.c(x) + self.pos
        x = self.a(x) + self.b(x)
        return x + x.size(0)


def test_adds_that_are_not_residuals_are_not_branches():
    assert ldbfx.branches(ldbfx.transform(NotResidual(), keep_first=0)) == ()


class TieBlock(nn.Module):
    """A shortcut with as many layers as the branch: the rule cannot tell them apart."""

    def __init__(self, dim=8):
        super().__init__()
        self.short, self.fc = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.detach = False

    def forward(self, x):
        # p = 0: the values do not change, but train and eval trace two graphs (both gated).
        h = torch.nn.functional.dropout(self.fc(torch.tanh(x)), 0.0, self.training)
        return self.short(x) + (h.detach() if self.detach else h)


def test_extra_branches_add_ties_and_reorient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), *[TieBlock() for _ in range(4)])
    assert ldbfx.branches(ldbfx.transform(model)) == ()  # ties: no branch
    gm = ldbfx.transform(model, extra_branches=[f"{i}.fc" for i in range(1, 5)])
    records = ldbfx.branches(gm)
    assert [(b.name, b.layers, b.skip_layers) for b in records] == [
        (str(i), (f"{i}.fc",), (f"{i}.short",)) for i in range(1, 5)]
    assert [b.eligible for b in records] == [False, True, True, False]
    # The added branch behaves as its detached reference, bit for bit.
    ref, x = copy.deepcopy(model), torch.randn(3, 4)
    ref[2].detach = True
    ldbfx.set_dropped_branches(gm, ["2"])
    loss_of(gm(x)).backward()
    loss_of(ref(x)).backward()
    _assert_grads_equal(grads(model), grads(ref))
    assert model[2].fc.weight.grad is None and model[2].short.weight.grad is not None
    assert gm.eval_code != gm.code  # the eval graph gates the added branch too
    model.zero_grad(set_to_none=True)
    loss_of(gm.eval()(x)).backward()
    assert model[2].fc.weight.grad is None and model[3].fc.weight.grad is not None
    # A shortcut with fewer layers than the branch, named as the branch: the user's word wins.
    records = ldbfx.branches(ldbfx.transform(Net(), extra_branches=["blocks.3.proj"]))
    assert records[3].layers == ("blocks.3.proj",)
    assert records[3].skip_layers == ("blocks.3.norm", "blocks.3.fc1", "blocks.3.fc2")
    assert records[2].layers == ("blocks.2.norm", "blocks.2.fc1", "blocks.2.fc2", "blocks.2")  # the rule


def test_extra_branches_bad_names():
    with pytest.raises(ldbfx.BranchNotFoundError, match="no layer named 'blocks.9.fc'. Layers are: inp, "):
        ldbfx.transform(Net(), extra_branches=["blocks.9.fc"])
    with pytest.raises(ldbfx.BranchNotFoundError, match="no residual add has 'inp' on one operand"):
        ldbfx.transform(Net(), extra_branches=["inp"])
    with pytest.raises(TypeError, match="extra_branches must be a list of layer names"):
        ldbfx.transform(Net(), extra_branches="blocks.1.fc1")
    with pytest.raises(TypeError, match="extra_branches must be a list of layer names"):
        ldbfx.transform(Net(), extra_branches=None)
    with pytest.raises(ldbfx.BranchNotFoundError, match="on both operands"):
        ldbfx.transform(Net(), extra_branches=["blocks.3.proj", "blocks.3.fc1"])


# ---------------------------------------------------------------------------------------------
# Zoo: discovery and the detached reference on real architectures.
# ---------------------------------------------------------------------------------------------
def _tv_vit():
    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64)


@pytest.mark.parametrize("make, count, first", [
    (torchvision.models.resnet18, 8, "layer1.0"),
    (torchvision.models.resnet50, 16, "layer1.0"),
    (_tv_vit, 8, "encoder.layers.encoder_layer_0.self_attention"),
    (lambda: timm.create_model("resnet18"), 8, "layer1.0"),
    (lambda: timm.create_model("convnext_atto"), 12, "stages.0.blocks.0"),
])
def test_zoo_branch_discovery(make, count, first):
    gm = ldbfx.transform(make())
    records = ldbfx.branches(gm)
    assert len(records) == count and records[0].name == first
    layer_names = {layer.name for layer in ldbfx.layers(gm)}
    assert all(set(b.layers) <= layer_names and b.layers for b in records)
    assert len({b.name for b in records}) == count


def test_resnet_projection_shortcuts_are_skips():
    gm = ldbfx.transform(torchvision.models.resnet18())
    by_name = {b.name: b for b in ldbfx.branches(gm)}
    assert by_name["layer2.0"].skip_layers == ("layer2.0.downsample.0", "layer2.0.downsample.1")
    assert by_name["layer2.0"].layers == ("layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2")
    assert by_name["layer2.1"].skip_layers == ()


def test_vit_has_an_attention_and_an_mlp_branch_per_block():
    gm = ldbfx.transform(_tv_vit())
    names = [b.name for b in ldbfx.branches(gm)]
    assert names[2:4] == ["encoder.layers.encoder_layer_1.self_attention", "encoder.layers.encoder_layer_1.mlp"]


@pytest.mark.parametrize("make, x, outputs", [
    (torchvision.models.resnet18, torch.randn(2, 3, 32, 32), {"layer2.0": "layer2.0.bn2", "layer3.1": "layer3.1.bn2"}),
    (_tv_vit, torch.randn(2, 3, 32, 32), {"encoder.layers.encoder_layer_1.mlp": "encoder.layers.encoder_layer_1.mlp",
                                          "encoder.layers.encoder_layer_2.self_attention":
                                              "encoder.layers.encoder_layer_2.dropout"}),
])
def test_zoo_gradients_and_flops_equal_the_detached_reference(make, x, outputs):
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    for module in outputs.values():
        ref.get_submodule(module).register_forward_hook(lambda m, i, o: o.detach())
    gm = ldbfx.transform(model)
    ldbfx.set_dropped_branches(gm, list(outputs))
    assert backward_flops(lambda: loss_of(gm(x))) == backward_flops(lambda: loss_of(ref(x)))
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    loss_of(gm(x)).backward()
    loss_of(ref(x)).backward()
    _assert_grads_equal(grads(model), grads(ref))


def test_eval_mode_graph_is_gated_too():
    # EfficientNet's StochasticDepth traces differently in eval mode: a second graph, gated alike.
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0()
    gm = ldbfx.transform(model)
    assert gm.eval_code != gm.code and gm.eval_code.count("ldbfx_ops_branch(") == gm.code.count("ldbfx_ops_branch(")
    name = next(b for b in ldbfx.branches(gm) if b.eligible).name
    ldbfx.set_dropped_branches(gm, [name])
    gm.eval()
    loss_of(gm(torch.randn(2, 3, 32, 32))).backward()
    record = next(b for b in ldbfx.branches(gm) if b.name == name)
    params = dict(model.named_parameters())
    inner = [p for layer in ldbfx.layers(gm) if layer.name in record.layers for p in layer.params]
    assert inner and all(params[p].grad is None for p in inner)


# ---------------------------------------------------------------------------------------------
# torch.compile: one compile for any branch mask, the dropped region's backward never runs.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_branch_drop_one_compile_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    gm = ldbfx.transform(model)
    compiled = torch.compile(gm)
    masks = [(), (1,), (2, 3), (), (4,), (1, 2, 3, 4), (3,)]
    frames = None
    for k, dropped in enumerate(masks):
        ldbfx.set_dropped_branches(gm, list(dropped))
        ref = _reference(model, dropped)
        model.zero_grad(set_to_none=True)
        loss_of(compiled(x)).backward()
        loss_of(ref(x)).backward()
        _assert_grads_equal(grads(model), grads(ref), exact=False)
        if k == 1:  # branch drop now in use: recompiled once into regions
            frames = torch._dynamo.utils.counters["frames"]["ok"]
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # no compile after that
    torch._dynamo.reset()


class InPlaceNet(Net):
    """Residual adds written in place (``out.add_(x)``, as ResNets' ``out += identity``)."""

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block.fc2(torch.relu(block.fc1(block.norm(x)))).add_(x)
        return self.out(x)


def test_compiled_in_place_residual_adds():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = InPlaceNet(depth=4), torch.randn(4, 8)
    gm = ldbfx.transform(model)
    assert [b.eligible for b in ldbfx.branches(gm)] == [False, True, True, False]
    compiled = torch.compile(gm, backend="aot_eager")
    for dropped in [(1,), (2,), ()]:
        ldbfx.set_dropped_branches(gm, list(dropped))
        model.zero_grad(set_to_none=True)
        loss_of(compiled(x)).backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        loss_of(gm(x)).backward()  # eager: the detached reference
        _assert_grads_equal(got, grads(model), exact=False)
    torch._dynamo.reset()


def test_nothing_dropped_means_no_graph_break():
    torch._dynamo.reset()
    gm = ldbfx.transform(Net())
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    loss_of(compiled(torch.randn(2, 8))).backward()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Hugging Face through torch.export
# ---------------------------------------------------------------------------------------------
def test_export_front_end_llama_branches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 12))
    gm = ldbfx.transform(model, example_kwargs={"input_ids": ids, "labels": ids})
    names = [b.name for b in ldbfx.branches(gm)]
    assert names == [f"model.layers.{i}.{part}" for i in range(3) for part in ("self_attn", "mlp")]
    ref = copy.deepcopy(model)
    ref.get_submodule("model.layers.1.mlp").register_forward_hook(lambda m, i, o: o.detach())
    ldbfx.set_dropped_branches(gm, ["model.layers.1.mlp"])
    gm(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    # Exported (ATen) kernels vs the eager model: compared on the gradient's scale.
    _assert_grads_equal(grads(model), grads(ref), exact=False)
    assert all(p.grad is None for p in model.model.layers[1].mlp.parameters())


# ---------------------------------------------------------------------------------------------
# The DropBP policy
# ---------------------------------------------------------------------------------------------
def test_allocate_rates_meets_the_flop_target_least_sensitive_first():
    rates = ldbfx.policies.allocate_rates([4.0, 1.0, 2.0], [10, 10, 20], target=12, step=0.1, max_rate=0.9)
    assert rates == [0.0, 0.9, 0.2]  # b1 and b2 cost 0.1 per FLOP, b0 0.4: b1 (lower index) first
    assert sum(r * f for r, f in zip(rates, [10, 10, 20])) >= 12


def test_dropbp_uniform_rate_and_resume_draw_the_same_masks():
    gm = ldbfx.transform(Net(depth=10))
    policy = ldbfx.DropBP(gm, drop_rate=0.5, seed=3)
    policy.start_epoch(0)
    for _ in range(5):
        policy.step()
    state = copy.deepcopy(policy.state_dict())
    ahead = []
    for _ in range(20):
        policy.step()
        ahead.append(policy.dropped)
    assert 0.3 < policy.stats["actual_drop_rate"] < 0.7
    other = ldbfx.DropBP(ldbfx.transform(Net(depth=10)), drop_rate=0.5, seed=99)
    other.load_state_dict(state)
    again = []
    for _ in range(20):
        other.step()
        again.append(other.dropped)
    assert again == ahead
    policy.end_epoch()
    assert ldbfx.dropped_branches(gm) == ()
    with pytest.raises(ValueError, match=r"drop_rate=0\.3 \(saved: 0\.5\)"):  # was silently replaced
        ldbfx.DropBP(ldbfx.transform(Net(depth=10)), drop_rate=0.3).load_state_dict(state)


def test_dropbp_sensitivity_allocation_counts_flops_and_spends_the_target():
    torch.manual_seed(0)
    model, x = Net(depth=6), torch.randn(8, 8)
    gm = ldbfx.transform(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = ldbfx.DropBP(gm, opt, drop_rate=0.4, allocation="sensitivity")
    rng = torch.get_rng_state()
    rates = policy.allocate(lambda: loss_of(gm(x)))
    assert torch.equal(torch.get_rng_state(), rng)  # the probes' seeding does not leak (nor on GPUs)
    assert set(rates) == {"blocks.1", "blocks.2", "blocks.3", "blocks.4"}
    assert all(v > 0 for v in policy.flops.values()) and all(v > 0 for v in policy.sensitivity.values())
    total = sum(policy.flops.values())
    assert sum(rates[n] * f for n, f in policy.flops.items()) >= 0.4 * total * (1 - 1e-6)
    assert all(p.grad is None for p in model.parameters())  # allocate() leaves .grad alone
    assert ldbfx.dropped_branches(gm) == () and not gm.ldbfx_state.skipped  # nor the next step
    assert policy.stats["allocation"] == "sensitivity"
    # The measured FLOPs of a branch are what dropping it saves, as the detached reference counts.
    full = backward_flops(lambda: loss_of(gm(x)))
    ldbfx.set_dropped_branches(gm, ["blocks.2"])
    assert full - backward_flops(lambda: loss_of(gm(x))) == policy.flops["blocks.2"]


def test_train_with_dropbp_policy(tmp_path):
    from ldbfx.app.train import TrainConfig, train

    result = train(TrainConfig(policy="dropbp", model="resnet18", epochs=2, batch_size=16, drop_rate=0.5,
                               max_steps_per_epoch=3, progress=False))
    assert len(result.history) == 2
    assert [row["mode"] for row in result.history] == ["dropbp", "dropbp"]  # drops every step: not "full"
    assert all(0.0 <= row["actual_drop_rate"] <= 1.0 for row in result.history)
    assert any(row["actual_drop_rate"] > 0 for row in result.history)
