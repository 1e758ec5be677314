"""ChannelDropBack: frozen slices (params and optimizer state), real savings, schedules, resume."""

import math

import pytest
import torch
from contract import assert_close_to_scale, backward_flops
from torch import nn

import ldbfx
from ldbfx import ops
from ldbfx.policies import channel_rate_at


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 5),
    )


def path(opaque):
    return ops.compiled_path() if opaque else torch.enable_grad()


@pytest.mark.parametrize("opaque", [False, True], ids=["eager", "opaque"])
@pytest.mark.parametrize("dim", [0, 1])
def test_kept_slices_get_full_gradients_and_frozen_ones_none(dim, opaque):
    model = cnn()
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    x = torch.randn(3, 3, 6, 6, requires_grad=True)
    gm(x).square().sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    full_x = x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None
    frozen = {"2": [0, 3, 5], "4": [1, 2], "6": [0, 7, 11]} if dim == 0 else {"2": [1, 2], "4": [0, 15], "6": [5, 6, 7]}
    ldbfx.set_frozen_rows(gm, frozen, dim=dim)
    with path(opaque):
        out = gm(x)
    out.square().sum().backward()
    # The selected layers compute dX and dW in separate calls (other kernels than the full
    # backward's fused one): compared on each tensor's scale.
    assert_close_to_scale(x.grad, full_x, what="x")
    for name, p in model.named_parameters():
        layer, kind = name.split(".")
        d = 0 if kind == "bias" else dim
        if layer not in frozen or (kind == "bias" and dim == 1):
            assert_close_to_scale(p.grad, full[name], what=name)
            continue
        rows = torch.tensor(frozen[layer])
        kept = torch.tensor([i for i in range(p.shape[d]) if i not in frozen[layer]])
        assert_close_to_scale(p.grad.index_select(d, kept), full[name].index_select(d, kept), what=name)
        assert p.grad.index_select(d, rows).abs().max() == 0


@pytest.mark.parametrize("dim", [0, 1])
def test_flops_saved_in_proportion_to_frozen_slices(dim):
    model = cnn()
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    x = torch.randn(4, 3, 6, 6)
    report = ldbfx.inspect.weight_grad_flops(gm, x)
    full = backward_flops(lambda: gm(x).sum())
    index = {l.name: l.index for l in ldbfx.layers(gm)}
    sizes = {"2": 16, "4": 16, "6": 12} if dim == 0 else {"2": 8, "4": 16, "6": 576}
    for fraction in (0.25, 0.5, 1.0):
        frozen = {name: list(range(int(size * fraction))) for name, size in sizes.items()}
        ldbfx.set_frozen_rows(gm, frozen, dim=dim)
        saved = full - backward_flops(lambda: gm(x).sum())
        # dW FLOPs of the three layers, times the fraction frozen (db costs no FLOPs).
        expected = sum(report.weight_grad[index[name]] * len(rows) / sizes[name] for name, rows in frozen.items())
        assert saved == pytest.approx(expected, rel=1e-6)
        assert saved > 0
    ldbfx.set_frozen_rows(gm, {})
    assert backward_flops(lambda: gm(x).sum()) == full


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("opaque", [False, True], ids=["eager", "opaque"])
def test_frozen_slices_untouched_by_optimizer_bit_for_bit(opt_name, opaque):
    model = cnn()
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    conv, lin = model[4], model[6]

    def train_step():
        with path(opaque):
            out = gm(torch.randn(2, 3, 6, 6))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # zeros left in .grad must not move frozen slices either

    train_step()  # optimizer state exists for every parameter
    ldbfx.set_frozen_rows(gm, {"4": [1, 5, 9], "6": [0, 2]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    for _ in range(3):
        train_step()
    for p, rows in ((conv.weight, [1, 5, 9]), (conv.bias, [1, 5, 9]), (lin.weight, [0, 2]), (lin.bias, [0, 2])):
        rows = torch.tensor(rows)
        name = next(n for n, q in model.named_parameters() if q is p)
        assert torch.equal(p.detach()[rows], before[name][rows])
        kept = torch.tensor([i for i in range(p.shape[0]) if i not in rows.tolist()])
        assert not torch.equal(p.detach()[kept], before[name][kept])  # the rest trains
        for key, value in opt.state[p].items():
            if value.shape == p.shape:
                assert torch.equal(value[rows], state_before[id(p)][key][rows]), key


def test_state_created_during_a_frozen_step_is_zero_there():
    model = cnn()
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ldbfx.set_frozen_rows(gm, {"6": [3]})
    gm(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert opt.state[model[6].weight]["momentum_buffer"][3].abs().max() == 0


def test_exact_mode_refuses_optimizer_state_that_is_not_per_element():
    # Adafactor keeps a statistic per row and per column of a matrix: the frozen rows' zero
    # gradients enter the column statistic, which exact mode cannot keep. Before, it changed
    # silently; now the step says so, and exact=False runs.
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    ldbfx.set_frozen_rows(gm, {"2": [3]})
    gm(torch.randn(4, 16)).sum().backward()
    with pytest.raises(ldbfx.LdbfxError, match=r"Adafactor's state .*col_var.* exact=False"):
        opt.step()
    ldbfx.set_frozen_rows(gm, {"2": [3]}, exact=False)
    opt.step()


def test_inexact_mode_lets_weight_decay_move_frozen_rows():
    model = cnn()
    gm = ldbfx.transform(model, keep_first=0, keep_last=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    ldbfx.set_frozen_rows(gm, {"6": [3]}, exact=False)
    before = model[6].weight.detach()[3].clone()
    gm(torch.randn(2, 3, 6, 6)).sum().backward()
    assert model[6].weight.grad[3].abs().max() == 0
    opt.step()
    torch.testing.assert_close(model[6].weight.detach()[3], before * (1 - 0.1 * 0.5))


def test_set_frozen_rows_validates():
    gm = ldbfx.transform(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), keep_first=0)
    with pytest.raises(ldbfx.LayerNotFoundError, match="only trainable linear and conv"):
        ldbfx.set_frozen_rows(gm, {"1": [0]})
    with pytest.raises(ldbfx.LayerNotFoundError, match="no eligible layer named 'nope'"):
        ldbfx.set_frozen_rows(gm, {"nope": [0]})
    with pytest.raises(ValueError, match="out of range"):
        ldbfx.set_frozen_rows(gm, {"0": [6]})
    with pytest.raises(ValueError, match="dim must be 0"):
        ldbfx.set_frozen_rows(gm, {"0": [1]}, dim=2)
    ldbfx.set_frozen_rows(gm, {"0": torch.tensor([True, False, False, False, False, True])})
    assert ldbfx.frozen_rows(gm) == {"0": [0, 5]}


def test_channel_rate_schedules():
    assert [channel_rate_at(e, "fixed", 0.5) for e in (0, 7)] == [0.5, 0.5]
    assert [channel_rate_at(e, "milestones", 0.3, [3, 6, 8]) for e in range(10)] == pytest.approx(
        [0, 0, 0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    assert [channel_rate_at(e, "ramp", 0.4, [2, 4]) for e in range(6)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4])
    gm = ldbfx.transform(nn.Sequential(*[nn.Linear(8, 8) for _ in range(8)]))
    policy = ldbfx.ChannelDropBack(gm, None, channel_rate=0.3, schedule="milestones", milestones=[2, 4])
    rates = []
    for epoch in range(5):
        policy.start_epoch(epoch)
        rates.append(policy.rate)
        assert (policy.frozen == {}) == (policy.rate == 0)
        policy.end_epoch()
    assert rates == pytest.approx([0, 0, 0.15, 0.15, 0.3])


def run(policy, gm, opt, epochs, steps, record=None):
    for epoch in range(epochs):
        policy.start_epoch(epoch)
        for _ in range(steps):
            if record is not None:
                record.append(policy.frozen)
            gm(torch.randn(2, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            policy.step()
        policy.end_epoch()


def mlp(n=10):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(n)])
    return model, ldbfx.transform(model), torch.optim.SGD(model.parameters(), lr=0.01)


def test_selection_rules_and_rates():
    _, gm, opt = mlp()
    policy = ldbfx.ChannelDropBack(gm, opt, layer_rate=1.0, channel_rate=0.25, seed=1)
    assert policy.candidates == tuple(str(i) for i in range(4, 10))  # the first four never
    seen = []
    run(policy, gm, opt, 2, 100, seen)
    assert all(len(f) == 1 for f in seen)  # paper: one layer per step
    assert {name for f in seen for name in f} == set(policy.candidates)
    stats = policy.stats
    rows = stats["rows_selected"]
    assert abs(stats["actual_channel_rate"] - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / rows)
    _, gm, opt = mlp()
    policy = ldbfx.ChannelDropBack(gm, opt, layer_rate=0.5, channel_rate=0.5, selection="independent", seed=2)
    seen = []
    run(policy, gm, opt, 1, 200, seen)
    draws = 200 * len(policy.candidates)
    assert abs(policy.stats["layers_selected"] / draws - 0.5) <= 4 * math.sqrt(0.25 / draws)
    assert max(len(f) for f in seen) > 1


def test_rescale_scales_kept_gradients():
    model, gm, opt = mlp()
    policy = ldbfx.ChannelDropBack(gm, opt, channel_rate=0.5, rescale=True, seed=0)
    policy.start_epoch(0)
    (name, rows), = policy.frozen.items()
    x = torch.randn(2, 16)
    layer = model[int(name)]
    plain = mlp()[0]  # same initial weights, no policy
    plain(x).square().mean().backward()
    expected = plain[int(name)].weight.grad.clone() * 16 / (16 - len(rows))
    captured = {}
    hook = opt.register_step_post_hook(lambda *a: captured.setdefault("g", layer.weight.grad.clone()))
    gm(x).square().mean().backward()
    opt.step()
    hook.remove()
    kept = [i for i in range(16) if i not in rows]
    assert_close_to_scale(captured["g"][kept], expected[kept], what="rescaled gradient")
    policy.remove()


def test_resume_gives_identical_slices_and_weights():
    model, gm, opt = mlp()
    policy = ldbfx.ChannelDropBack(gm, opt, channel_rate=0.5, schedule="ramp", milestones=[3], seed=5)
    torch.manual_seed(1)
    full = []
    run(policy, gm, opt, 4, 5, full)
    final = [p.detach().clone() for p in model.parameters()]

    model, gm, opt = mlp()
    policy = ldbfx.ChannelDropBack(gm, opt, channel_rate=0.5, schedule="ramp", milestones=[3], seed=5)
    torch.manual_seed(1)
    first = []
    run(policy, gm, opt, 2, 5, first)
    state = policy.state_dict()
    rng = torch.get_rng_state()
    model2 = nn.Sequential(*[nn.Linear(16, 16) for _ in range(10)])
    model2.load_state_dict(model.state_dict())
    gm2 = ldbfx.transform(model2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    policy2 = ldbfx.ChannelDropBack(gm2, opt2, channel_rate=0.5, schedule="ramp", milestones=[3], seed=5)
    policy2.load_state_dict(state)
    torch.set_rng_state(rng)
    rest = []
    for epoch in (2, 3):
        policy2.start_epoch(epoch)
        for _ in range(5):
            rest.append(policy2.frozen)
            gm2(torch.randn(2, 16)).square().mean().backward()
            opt2.step()
            opt2.zero_grad()
            policy2.step()
        policy2.end_epoch()
    assert first + rest == full
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"layer_rate": 0.0}, "layer_rate"), ({"channel_rate": 1.5}, "channel_rate"),
    ({"schedule": "step"}, "schedule must be"), ({"schedule": "ramp"}, "milestones"),
    ({"schedule": "milestones", "milestones": [3, 2]}, "milestones"), ({"dim": 2}, "dim"),
    ({"selection": "all"}, "selection"), ({"skip_first": 10}, "no candidate"),
    ({"rescale": True}, "pass the optimizer"),
])
def test_arguments_validated(kwargs, match):
    _, gm, _ = mlp()
    with pytest.raises(ValueError, match=match):
        ldbfx.ChannelDropBack(gm, None, **kwargs)
