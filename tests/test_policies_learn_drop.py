"""Learn&Drop: scores, the drop rule and its guard, backward truncation, the feature cache, resume."""

import pytest
import torch
import torchvision
from contract import backward_flops
from torch import nn

import ldbfx
from ldbfx.errors import LdbfxError
from ldbfx.policies.learn_drop import drop_count, layer_change_scores, standardize


def mlp(n=6):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(n - 1) for m in (nn.Linear(8, 8), nn.ReLU())], nn.Linear(8, 3))
    return model, ldbfx.transform(model, keep_first=0)  # (LayerDropBack's eligibility does not matter here)


def test_scores_equal_a_direct_computation():
    model, gm = mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = ldbfx.LearnAndDrop(gm, opt, warmup_epochs=5)
    policy.start_epoch(0)
    grads = {i: [] for i in range(4)}
    weights = [m for m in model if isinstance(m, nn.Linear)]
    for _ in range(5):
        gm(torch.randn(4, 8)).square().mean().backward()
        for i, layer in enumerate(weights):
            grads[i].append(layer.weight.grad.clone())
        opt.step()
        opt.zero_grad()
    direct = []
    for i in range(4):
        g = torch.stack(grads[i]).double()  # [steps, out, in]
        direct.append(1 - (g.sum(0).abs().sum() / g.abs().sum()).item())
    assert policy.scores() == pytest.approx(direct, rel=1e-5)
    assert all(0 <= s <= 1 for s in direct)
    # A gradient that flips sign every step cancels: P = 1; a constant one: P = 0.
    assert layer_change_scores([torch.zeros(3)], [torch.ones(3) * 2]) == [1.0]
    assert layer_change_scores([torch.ones(3) * 2], [torch.ones(3) * 2]) == [0.0]


def test_standardize_and_drop_rule_on_crafted_scores():
    z = standardize([0.2, 0.4, 0.6])
    assert z == pytest.approx([-1.2247449, 0, 1.2247449])
    assert standardize([0.5, 0.5, 0.5]) == [0, 0, 0]
    assert drop_count([1.0, 0.5, -0.2, 0.4, -1.7]) == 2     # first + -> - after the second layer
    assert drop_count([1.0, -0.5, 0.9, -1.4]) == 1          # the first change wins
    assert drop_count([-1.0, -0.3, 0.2, 1.1]) == 0          # increasing: no + -> - change
    assert drop_count([0.0, 0.0, 0.0]) == 0
    assert drop_count([0.8, 0.6, -1.4]) == 2
    # Guard: the candidates' median must exceed the median of the stored scores.
    assert drop_count([0.8, 0.6, -1.4], stored=[0.5, 0.6, 0.7]) == 2     # 0.7 > 0.6
    assert drop_count([0.8, 0.6, -1.4], stored=[0.5, 0.7, 0.9]) == 0     # 0.7 <= 0.7
    assert drop_count([0.3, -0.3], stored=[1.0]) == 0


def test_policy_applies_rule_after_warmup_and_never_drops_the_last_layer(monkeypatch):
    model, gm = mlp(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = ldbfx.LearnAndDrop(gm, opt, warmup_epochs=2)
    crafted = iter([[0.9, 0.8, 0.1, 0.2, 0.1, 0.1], [0.9, 0.1, 0.5, 0.1], [0.5, 0.5, 0.5, 0.5]])
    monkeypatch.setattr(policy, "scores", lambda: next(crafted))
    for epoch in range(5):
        policy.start_epoch(epoch)
        gm(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        policy.end_epoch()
    assert [h["epoch"] for h in policy.history] == [2, 3, 4]  # epochs 0, 1 are the warm-up
    assert policy.history[0]["dropped"] == ["0", "2"]
    assert policy.history[1]["dropped"] == ["4"]  # head 4, 6, 8, 10; guard passes
    assert policy.history[2]["dropped"] == []     # no sign change
    assert policy.frozen_layers == ("0", "2", "4")
    assert all(not p.requires_grad for i in (0, 2, 4) for p in model[i].parameters())
    assert all(p.requires_grad for i in (6, 8, 10) for p in model[i].parameters())


def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return model, ldbfx.transform(model)


def test_backward_stops_at_the_cut():
    model, gm = resnet()
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0)
    x = torch.randn(2, 3, 32, 32)
    full = backward_flops(lambda: gm(x).sum())
    policy.freeze_units(5)  # prefix: conv1 .. layer1.1.conv2 and their BNs
    truncated = backward_flops(lambda: gm(x).sum())
    policy._build_split_modules()
    crossing = policy._prefix(x)
    assert crossing and not any(t.requires_grad for t in crossing)  # autograd records nothing before the cut
    # FLOPs: the prefix's whole backward (dW and dX) is gone.
    frozen = torchvision.models.resnet18(num_classes=10)
    frozen.load_state_dict(model.state_dict())
    frozen.train()
    prefix = nn.Sequential(frozen.conv1, frozen.bn1, frozen.relu, frozen.maxpool, frozen.layer1)
    for p in prefix.parameters():
        p.requires_grad_(False)
    expected = backward_flops(lambda: frozen(x).sum())
    assert truncated == expected < 0.8 * full
    assert all(p.grad is None for p in model.layer1.parameters())
    assert model.layer2[0].conv1.weight.grad is not None


def test_frozen_batchnorm_keeps_running_statistics():
    model, gm = resnet()
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0)
    policy.freeze_units(3)
    gm.eval()
    gm.train()  # pinned modules stay in eval mode
    assert not model.bn1.training and not model.layer1[0].bn2.training and model.layer1[1].bn1.training
    before = model.bn1.running_mean.clone(), model.layer1[1].bn1.running_mean.clone()
    gm(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before[0])
    assert not torch.equal(model.layer1[1].bn1.running_mean, before[1])


@pytest.mark.parametrize("cache", ["memory", "disk"])
@pytest.mark.parametrize("units", [3, 4])  # a cut between residual blocks, and inside one
def test_cache_gives_the_same_head_outputs_and_gradients(cache, units, tmp_path):
    model, gm = resnet()
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0, cache=cache, num_samples=8, cache_dir=str(tmp_path))
    policy.freeze_units(units)
    data = torch.randn(8, 3, 16, 16)
    for epoch in range(2):  # first epoch fills the cache, the second reads it
        for batch in (torch.arange(0, 4), torch.arange(4, 8)):
            x = data[batch]
            model.zero_grad(set_to_none=True)
            gm(x).square().mean().backward()
            want_out = gm(x).detach()
            want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            out = policy.forward(x, batch)
            out.square().mean().backward()
            torch.testing.assert_close(out.detach(), want_out, rtol=1e-4, atol=1e-5)
            got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert got.keys() == want.keys()
            for n, g in want.items():
                torch.testing.assert_close(got[n], g, rtol=1e-3, atol=1e-5)
    assert bool(policy._store["filled"].all())
    # Between blocks one tensor crosses; inside layer1.1 the block input (skip) and the branch do.
    assert len(policy._crossing) == (1 if units == 3 else 2)
    if cache == "disk":
        assert any(tmp_path.iterdir())


def test_cache_refuses_random_augmentation_unless_allowed():
    _, gm = resnet()
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0, cache="memory", num_samples=4)
    policy.freeze_units(2)
    x, idx = torch.randn(4, 3, 32, 32), torch.arange(4)
    policy.forward(x, idx)
    policy.forward(x, idx)  # the same inputs: fine
    with pytest.raises(LdbfxError, match="random data augmentation"):
        policy.forward(torch.flip(x, dims=[3]), idx)
    policy.allow_random_inputs = True
    policy.forward(torch.flip(x, dims=[3]), idx)
    with pytest.raises(ValueError, match="dataset indices"):
        policy.forward(x)


def test_evaluation_runs_the_full_model():
    _, gm = resnet()
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0, cache="memory", num_samples=4)
    policy.freeze_units(2)
    x = torch.randn(4, 3, 32, 32)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(policy.forward(x, torch.arange(4)), gm(x))
    assert policy._store is None


def test_resume_continues_identically():
    def make():
        model, gm = mlp(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        return model, gm, opt, ldbfx.LearnAndDrop(gm, opt, warmup_epochs=1)

    def epochs(model, gm, opt, policy, start, stop):
        for epoch in range(start, stop):
            torch.manual_seed(100 + epoch)
            policy.start_epoch(epoch)
            for _ in range(6):
                x = torch.randn(16, 8)
                torch.nn.functional.cross_entropy(gm(x), (x[:, 0] > 0).long()).backward()
                opt.step()
                opt.zero_grad()
            policy.end_epoch()

    model, gm, opt, policy = make()
    epochs(model, gm, opt, policy, 0, 6)
    model_a, gm_a, opt_a, policy_a = make()
    epochs(model_a, gm_a, opt_a, policy_a, 0, 3)
    state = {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "policy": policy_a.state_dict()}
    model_b, gm_b, opt_b, policy_b = make()
    model_b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    policy_b.load_state_dict(state["policy"])
    epochs(model_b, gm_b, opt_b, policy_b, 3, 6)
    assert policy_b.history == policy.history
    assert policy.frozen_layers  # the run did drop something
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_epochs": -1}, "warmup_epochs"), ({"warmup_epochs": 1, "cache": "ram"}, "cache must be"),
    ({"warmup_epochs": 1, "cache": "memory"}, "num_samples"),
])
def test_arguments_validated(kwargs, match):
    _, gm = mlp()
    with pytest.raises(ValueError, match=match):
        ldbfx.LearnAndDrop(gm, None, **kwargs)


def test_freeze_units_never_reinstates():
    _, gm = mlp(6)
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0)
    policy.freeze_units(2)
    assert policy.frozen_layers == ("0", "2")
    with pytest.raises(ValueError, match="never reinstated"):
        policy.freeze_units(1)
    with pytest.raises(ValueError, match="last scored layer always trains"):
        policy.freeze_units(6)


def test_a_state_saved_with_other_settings_is_refused():
    model, gm = mlp(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ldbfx.LearnAndDrop(gm, opt, warmup_epochs=1).state_dict()
    with pytest.raises(ValueError, match=r"warmup_epochs=2 \(saved: 1\)"):
        ldbfx.LearnAndDrop(gm, opt, warmup_epochs=2).load_state_dict(state)
