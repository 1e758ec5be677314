"""Layer discovery and the eligibility rule."""

import pytest
import torch
from torch import nn

import ldbfx


def mlp(n=8):
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])


def test_default_rule_first_four_and_last_always_train():
    gm = ldbfx.transform(mlp())
    assert [l.eligible for l in ldbfx.layers(gm)] == [False] * 4 + [True] * 3 + [False]
    assert [l.reason for l in ldbfx.layers(gm)][:5] == ["first 4"] * 4 + [""]
    assert ldbfx.layers(gm)[-1].reason == "last 1"


@pytest.mark.parametrize("keep_first,keep_last", [(0, 0), (2, 3), (8, 0)])
def test_keep_options(keep_first, keep_last, recwarn):
    gm = ldbfx.transform(mlp(), keep_first=keep_first, keep_last=keep_last)
    eligible = [l.index for l in ldbfx.layers(gm) if l.eligible]
    assert eligible == list(range(keep_first, 8 - keep_last))
    assert bool(recwarn.list) == (not eligible)  # NoEligibleLayerWarning exactly when none


def test_filter_receives_module_and_name():
    seen = []

    def only_odd(module, name):
        seen.append((type(module), name))
        return int(name) % 2 == 1

    gm = ldbfx.transform(mlp(), filter=only_odd, keep_first=0, keep_last=0)
    assert [l.name for l in ldbfx.layers(gm) if l.eligible] == ["1", "3", "5", "7"]
    assert (nn.Linear, "0") in seen
    assert ldbfx.layers(gm)[0].reason == "filter"


def test_frozen_layers_are_not_eligible():
    model = mlp()
    model[5].requires_grad_(False)
    gm = ldbfx.transform(model)
    assert ldbfx.layers(gm)[5].reason == "frozen"


def test_invalid_options_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="keep_first must be an integer >= 0"):
        ldbfx.transform(mlp(), keep_first=-1)
    with pytest.raises(TypeError, match="filter must be a callable"):
        ldbfx.transform(mlp(), filter="conv")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ldbfx.transform(lambda x: x)


def test_no_eligible_layer_warns_and_still_works():
    model = mlp(3)
    with pytest.warns(ldbfx.NoEligibleLayerWarning, match="no eligible layer"):
        gm = ldbfx.transform(model)
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))


def test_layer_records():
    layer = ldbfx.layers(ldbfx.transform(mlp()))[4]
    assert layer == ldbfx.Layer(index=4, name="4", params=("4.weight", "4.bias"), eligible=True,
                                reason="", op="call_module", type="Linear", kind="linear",
                                saves_compute=True, numel=20, nodes=("_4",))


def test_layers_requires_a_transformed_model():
    with pytest.raises(TypeError, match="ldbfx.transform"):
        ldbfx.layers(mlp())
