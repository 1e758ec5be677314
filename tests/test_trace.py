"""Tracing: both training modes, trace-time constants, readable errors, tracer options."""

import re
import pytest
import torch
from torch import nn

import ldbfx
from contract import assert_outputs_equal
from models import CUSTOM


def test_mode_dependent_model_gets_two_graphs():
    make_model, make_input = CUSTOM["mode_dependent"]
    model = make_model()
    gm = ldbfx.transform(model)
    assert gm.code != gm.eval_code
    assert "dropout" in gm.code and "dropout" in gm.eval_code  # F.dropout(training=...) baked per mode
    x = make_input()
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        torch.manual_seed(1)
        ref = model(x)
        torch.manual_seed(1)
        assert_outputs_equal(ref, gm(x))


def test_models_without_mode_branches_get_one_graph():
    gm = ldbfx.transform(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)), keep_first=0)
    assert gm.eval_code == gm.code  # nn.Dropout is a leaf: it reads self.training at run time


def test_tensor_constants_become_non_persistent_buffers():
    make_model, _ = CUSTOM["mode_dependent"]
    model = make_model()
    gm = ldbfx.transform(model)
    constants = [n for n, _ in gm.named_buffers() if n.startswith("_tensor_constant")]
    assert constants, "the model creates a tensor in forward"
    assert not any(n.startswith("_tensor_constant") for n in gm.state_dict())
    assert not any(k.startswith("_tensor_constant") for k in vars(model))  # user's model untouched
    gm.to(torch.float64)  # moved with the module, like any buffer
    assert all(getattr(gm, n).dtype == torch.float64 for n in constants)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.lin(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.body = nn.Sequential(nn.ReLU(), Branchy())

    def forward(self, x):
        return self.body(self.stem(x))


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(ldbfx.TraceError) as info:
        ldbfx.transform(Outer())
    message = str(info.value)
    assert "inside module 'body.1' (Branchy)" in message
    assert "leaf_modules=[Branchy]" in message and "concrete_args" in message
    assert isinstance(info.value.__cause__, Exception)


def test_leaf_modules_fix_an_untraceable_module():
    model = Outer()
    gm = ldbfx.transform(model, leaf_modules=[Branchy], keep_first=0, keep_last=0)
    layer = {l.name: l for l in ldbfx.layers(gm)}["body.1"]
    assert layer.kind == "module" and layer.params == ("body.1.lin.weight", "body.1.lin.bias")
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    ldbfx.set_dropped(gm, ["body.1"])
    gm(torch.ones(2, 4)).sum().backward()
    assert model.body[1].lin.weight.grad is None and model.stem.weight.grad is not None


class WithFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b=True):
        return self.b(self.a(x)) if use_b else self.a(x)


def test_concrete_args():
    model = WithFlag()
    gm = ldbfx.transform(model, concrete_args={"use_b": False}, keep_first=0, keep_last=0)
    assert [l.name for l in ldbfx.layers(gm)] == ["a"]


def test_custom_tracer_class():
    class CountingTracer(torch.fx.Tracer):
        calls = 0

        def trace(self, root, concrete_args=None):
            CountingTracer.calls += 1
            return super().trace(root, concrete_args)

    gm = ldbfx.transform(nn.Sequential(*[nn.Linear(3, 3) for _ in range(6)]), tracer_class=CountingTracer)
    assert CountingTracer.calls == 2  # one trace per training mode
    assert len(ldbfx.layers(gm)) == 6


def test_mixed_submodule_modes_are_kept():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[1].eval()  # a frozen-BN fine-tuning setup
    gm = ldbfx.transform(model, keep_first=0)
    assert gm.training and not gm.get_submodule("1").training


def test_exported_graphs_refuse_a_module_in_another_mode():
    # torch.export bakes the whole model's mode into every module, so a BatchNorm put in eval mode
    # alone (frozen statistics) silently kept training them; FX reads the mode as it runs (above).
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    x = torch.randn(3, 4)
    gm = ldbfx.transform(model, example_args=(x,), keep_first=0)
    gm(x)
    gm.train()
    model[1].eval()
    stats = model[1].running_mean.clone()
    with pytest.raises(ldbfx.LdbfxError, match=r"module\(s\) '1' are in eval mode while the model is in "
                                               r"train mode.*transform it with the FX front end"):
        gm(x)
    assert torch.equal(model[1].running_mean, stats)  # refused before the graph ran
    gm.eval()
    model[1].train()  # MC dropout's pattern: the eval graph would silently run it in eval mode
    with pytest.raises(ldbfx.LdbfxError, match=r"'1' are in train mode while the model is in eval mode"):
        gm(x)
    gm.eval()
    gm(x)  # one mode again
    # Installed, the model's own train() switches the graph, and the check follows it, also
    # when the model's mode stays (a loop calling model.train() each step, then freezing BN).
    ldbfx.install(model, gm)
    model.train()
    model(x)
    model.train()
    model[1].eval()
    with pytest.raises(ldbfx.LdbfxError, match="'1' are in eval mode"):
        model(x)
    ldbfx.uninstall(model)
    assert "train" not in model.__dict__  # the model's own train() again
    # Compiled, the check runs while Dynamo traces: its guards on the modes retrace after a change,
    # even one made without gm.train().
    gm.train()
    compiled = torch.compile(gm, backend="eager")
    compiled(x).sum().backward()
    model[1].eval()
    with pytest.raises(ldbfx.LdbfxError, match="'1' are in eval mode"):
        compiled(x)


class _OptionalMask(nn.Module):
    """Hiera's pattern (timm ``hiera_tiny_224``): an optional tensor argument dereferenced
    behind ``if mask is not None``, which tracing with a proxy always enters."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(5)])
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask.view(x.shape[0], 1, 1, 1).to(x.dtype)
        return self.fc(self.convs(x).flatten(1))


class _PassThroughMask(nn.Module):
    """An optional argument only handed on to a module that accepts None: stays an input."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        x = self.layers(x)
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def test_optional_argument_dereferenced_behind_a_none_check_is_traced_as_none():
    model = _OptionalMask()
    gm = ldbfx.transform(model)
    x = torch.randn(2, 3, 4, 4)
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        assert torch.equal(gm(x), model(x))  # before: AttributeError, 'NoneType' has no 'view'
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        gm(x, torch.ones(2))  # passing it is refused, never silently ignored
    # Asked for as an input (FX's placeholder marker): the graph takes the mask, and needs it.
    given = ldbfx.transform(model, concrete_args={"mask": torch.fx.PH})
    mask = torch.tensor([1.0, 0.0])
    assert torch.equal(given(x, mask), model(x, mask))


def test_optional_argument_passed_on_stays_an_input():
    model = _PassThroughMask()
    gm = ldbfx.transform(model)
    x, padding = torch.randn(2, 5, 8), torch.tensor([[False] * 4 + [True]] * 2)
    model.eval(), gm.eval()
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(x, padding), model(x, padding))


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)], nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
                         nn.Linear(6, 6), nn.Linear(6, 2))


def test_hooks_on_leaf_modules_run_and_the_module_is_called_as_a_whole():
    model = _stack()
    calls = []
    model[5].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model[5].register_forward_hook(lambda m, args, out: calls.append("post"))
    model[5].register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    gm = ldbfx.transform(model)
    layer = next(l for l in ldbfx.layers(gm) if l.name == "5")
    assert layer.kind == "module" and not layer.saves_compute  # called as a module: hooks run
    x = torch.randn(3, 6, requires_grad=True)
    assert torch.equal(gm(x), model(x))
    calls.clear()
    gm(x).sum().backward()
    assert calls == ["pre", "post", "backward"]
    ldbfx.set_dropped(gm, ["5"])
    model.zero_grad(set_to_none=True)
    gm(x).sum().backward()
    assert model[5].weight.grad is None and model[6].weight.grad is not None


def test_old_style_weight_norm_is_not_stale():
    # torch.nn.utils.weight_norm recomputes `weight` in a forward pre-hook. Before, the graph
    # read a stale `weight` attribute: outputs went wrong after the first optimizer step.
    model = _stack()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model[5])
    gm = ldbfx.transform(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(3, 6)
    for _ in range(2):
        gm(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(gm(x), model(x))
    assert model[5].weight_g.grad is None  # zero_grad; and it trained: weight_g moved below
    assert not torch.equal(model[5].weight_g, _stack()[5].weight.norm(dim=1, keepdim=True))


def test_hooks_on_an_inlined_module_are_refused_with_the_way_out():
    model = _stack()
    model[4].register_forward_hook(lambda m, args, out: None)  # a Sequential: traced through
    with pytest.raises(ldbfx.TraceError, match=r"module '4' \(Sequential\) has forward or backward hooks.*leaf_modules=\['4'\]"):
        ldbfx.transform(model)
    gm = ldbfx.transform(model, leaf_modules=["4"])  # the suggested fix works
    assert torch.equal(gm(torch.ones(1, 6)), model(torch.ones(1, 6)))


def test_activation_checkpointing_inside_forward_is_refused():
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = _stack()

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.blocks, x, use_reentrant=False)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = Checkpointed(), nn.Linear(2, 2)

        def forward(self, x):
            return self.head(self.inner(x))

    with pytest.raises(ldbfx.TraceError, match=r"module 'inner' \(.*Checkpointed\) calls torch.utils."
                                               "checkpoint.*activation_checkpointing_disable"):
        ldbfx.transform(Outer())
    model = Outer()
    gm = ldbfx.transform(model, leaf_modules=["inner"], keep_first=0)  # called whole: still checkpointed
    x = torch.randn(2, 6)
    assert torch.equal(gm(x), model(x))


def test_global_module_hooks_are_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        with pytest.raises(ldbfx.TraceError, match="global module hooks"):
            ldbfx.transform(_stack())
    finally:
        handle.remove()


@pytest.mark.parametrize("how", ["non_reentrant", "reentrant", "checkpoint_wrapper"])
def test_export_never_silently_inlines_a_checkpoint(how):
    """torch.export traced through ``checkpoint`` and kept every activation without a word: the
    capture from an example batch now refuses it as the FX path does, naming the module."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            if how == "checkpoint_wrapper":
                self.blocks = nn.ModuleList(checkpoint_wrapper(b) for b in self.blocks)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            for block in self.blocks:
                if how == "checkpoint_wrapper":
                    x = block(x)
                else:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=how == "reentrant")
            return self.head(x)

    model = Net()
    name = "blocks.0._checkpoint_wrapped_module" if how == "checkpoint_wrapper" else "blocks.0"
    with pytest.raises(ldbfx.TraceError, match=rf"module '{re.escape(name)}' \(.*Block\) is checkpointed.*"
                                               "activation_checkpointing_disable"):
        ldbfx.transform(model, example_args=(torch.randn(2, 6),))
    import torch.utils.checkpoint as ckpt
    assert ckpt._checkpoint_impl.__name__ == "_checkpoint_impl"  # the capture's patch is undone
