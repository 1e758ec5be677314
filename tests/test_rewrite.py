"""The core contract on the model zoo and on custom models (tests/contract.py does the checks)."""

import pytest
import torch

import ldbfx
from contract import check_all, loss_of, run
from models import CUSTOM, ZOO


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_contract(name):
    make_model, make_input = ZOO[name]
    gm = check_all(make_model, make_input())
    layers = ldbfx.layers(gm)
    assert sum(l.eligible for l in layers) >= 1
    # Most of a vision model's weight-gradient FLOPs live in conv/linear/attention layers.
    assert any(l.saves_compute for l in layers if l.eligible)


@pytest.mark.parametrize("name", [n for n in CUSTOM if n != "attention_variety"])
def test_custom_contract(name):
    make_model, make_input = CUSTOM[name]
    check_all(make_model, make_input())


def test_attention_variety_contract():
    # Keep nothing but the first layer so every attention configuration is eligible.
    make_model, make_input = CUSTOM["attention_variety"]
    gm = check_all(make_model, make_input(), keep_first=1, keep_last=1)
    kinds = {l.name: l.kind for l in ldbfx.layers(gm)}
    assert kinds["self_attn"] == kinds["cross"] == kinds["separate"] == "attention"


def test_tied_weights_form_one_layer():
    make_model, _ = CUSTOM["tied_lm"]
    model = make_model()
    gm = ldbfx.transform(model)
    tied = [l for l in ldbfx.layers(gm) if "embed.weight" in l.params]
    assert len(tied) == 1 and tied[0].nodes == ("embed", "head")
    assert tied[0].kind == "embedding+linear" and tied[0].index == 0


def test_module_called_twice_is_one_layer():
    model = CUSTOM["shared_block"][0]()
    gm = ldbfx.transform(model)
    shared = [l for l in ldbfx.layers(gm) if l.name == "shared"]
    assert len(shared) == 1 and len(shared[0].nodes) == 2
    ldbfx.set_dropped(gm, ["shared"])
    loss_of(gm(torch.randn(4, 10))).backward()
    assert model.shared.weight.grad is None and model.layers[4].weight.grad is not None


def test_functional_layer_names_and_kinds():
    gm = ldbfx.transform(CUSTOM["functional"][0]())
    got = [(l.name, l.kind) for l in ldbfx.layers(gm)]
    assert got == [
        ("stem", "conv"), ("cls_token", "param"), ("pos_embed", "param"), ("w1+b1", "linear"),
        ("w2", "matmul"), ("gamma", "param"), ("w3", "linear"), ("head", "linear"),
    ]


def test_shares_parameters_and_modules_with_model():
    model = ZOO["tv_resnet18"][0]()
    gm = ldbfx.transform(model)
    assert all(a is b for a, b in zip(gm.parameters(), model.parameters()))
    assert gm.layer1 is model.layer1
    # An optimizer built on the original trains the transformed model, and the other way round.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = gm.fc.weight.detach().clone()
    loss_of(gm(torch.randn(2, 3, 32, 32))).backward()
    opt.step()
    assert not torch.equal(before, gm.fc.weight)


def test_checkpoint_loads_into_original_architecture():
    make_model, make_input = ZOO["tv_mobilenet_v3_small"]
    gm = ldbfx.transform(make_model())
    fresh = make_model()
    fresh.load_state_dict(gm.state_dict())  # strict
    gm.eval(), fresh.eval()
    x = make_input()
    assert torch.equal(gm(x), fresh(x))
    gm.load_state_dict(fresh.state_dict())  # and back


def test_code_reads_like_the_model():
    gm = ldbfx.transform(ZOO["tv_resnet18"][0]())
    assert "layer1_0_conv1 = ldbfx_ops_conv(" in gm.code
    assert "fc = ldbfx_ops_linear(" in gm.code


def test_generic_leaf_module_is_gated():
    # PReLU and ConvTranspose2d have no dedicated handler: gradient gated, nothing saved.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU(4), torch.nn.Conv2d(4, 4, 3), torch.nn.PReLU(4),
        torch.nn.ConvTranspose2d(4, 4, 3), torch.nn.PReLU(4), torch.nn.Conv2d(4, 2, 1),
    )
    gm = ldbfx.transform(model, keep_first=1)
    kinds = {l.name: (l.kind, l.saves_compute) for l in ldbfx.layers(gm)}
    assert kinds["4"] == ("module", False) and kinds["3"] == ("module", False)
    x = torch.randn(2, 3, 10, 10)
    torch.manual_seed(0)
    assert torch.equal(gm(x), model(x))
    ldbfx.set_dropped(gm, ["3", "4"])
    loss_of(gm(x)).backward()
    assert model[3].weight.grad is None and model[4].weight.grad is None
    assert model[5].weight.grad is not None and model[2].weight.grad is not None


def test_transform_twice_is_refused():
    gm = ldbfx.transform(torch.nn.Sequential(torch.nn.Linear(2, 2)), keep_first=0, keep_last=0)
    with pytest.raises(TypeError, match="already transformed"):
        ldbfx.transform(gm)


def test_deepcopy_keeps_behaviour():
    import copy

    make_model, make_input = CUSTOM["mode_dependent"]
    gm = ldbfx.transform(make_model())
    twin = copy.deepcopy(gm)
    x = make_input()
    twin.eval(), gm.eval()
    assert torch.equal(twin(x), gm(x))
    assert all(a is not b for a, b in zip(twin.parameters(), gm.parameters()))
    ldbfx.set_dropped(twin, [4])
    twin.train()
    loss_of(run(twin, x)).backward()
    assert twin.layers[4].weight.grad is None and gm.layers[4].weight.grad is None
    assert twin.layers[3].weight.grad is not None
