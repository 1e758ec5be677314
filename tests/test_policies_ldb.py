"""The LayerDropBack policy: epoch modes, selection, LR and batch factors, resume."""

import math

import pytest
import torch
from torch import nn

import ldbfx
from ldbfx.policies import is_drop_epoch


def make(n=12):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])
    gm = ldbfx.transform(model)
    return model, gm, torch.optim.SGD(model.parameters(), lr=0.1)


def run_epoch(policy, gm, opt, steps, record=None):
    policy.start_epoch(policy.epoch + 1 if policy.epoch is not None else 0)
    for _ in range(steps):
        if record is not None:
            record.append(policy.dropped)
        gm(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        policy.step()
    policy.end_epoch()


def test_drop_epochs_follow_eq1():
    assert [e for e in range(9) if is_drop_epoch(e, 2)] == [2, 4, 6, 8]
    assert [e for e in range(4) if is_drop_epoch(e, 1)] == [1, 2, 3]  # s=1: all but epoch 0
    _, gm, opt = make()
    policy = ldbfx.LayerDropBack(gm, opt, period=3)
    modes = []
    for epoch in range(7):
        policy.start_epoch(epoch)
        modes.append(policy.dropping)
        policy.end_epoch()
    assert modes == [False, False, False, True, False, False, True]


def test_only_eligible_layers_drop_and_rate_matches():
    _, gm, opt = make(24)
    policy = ldbfx.LayerDropBack(gm, opt, drop_rate=0.3, period=1, seed=3)
    seen = []
    for _ in range(6):
        run_epoch(policy, gm, opt, 25, seen)
    eligible = {l.name for l in ldbfx.layers(gm) if l.eligible}
    assert set().union(*map(set, seen)) <= eligible
    stats = policy.stats
    draws = stats["layer_draws"]
    # Binomial: actual rate within 4 standard deviations of the configured one.
    assert abs(stats["actual_drop_rate"] - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / draws)
    assert stats["steps_full"] == 25 and stats["steps_drop"] == 125


def test_masks_change_per_step_or_per_epoch():
    _, gm, opt = make(24)
    per_step, per_epoch = [], []
    run = ldbfx.LayerDropBack(gm, opt, drop_rate=0.5, period=1)
    run.start_epoch(1)
    for _ in range(5):
        per_step.append(run.dropped)
        run.step()
    run.remove()
    run = ldbfx.LayerDropBack(gm, opt, drop_rate=0.5, period=1, resample="epoch")
    run.start_epoch(1)
    for _ in range(5):
        per_epoch.append(run.dropped)
        run.step()
    assert len(set(per_step)) > 1 and len(set(per_epoch)) == 1
    run.end_epoch()
    assert ldbfx.dropped(gm) == ()  # evaluation after end_epoch runs with full backprop


def test_batch_factor():
    _, gm, opt = make()
    policy = ldbfx.LayerDropBack(gm, opt, kappa=2.0)
    policy.start_epoch(1)
    assert policy.batch_size(64) == 64
    policy.start_epoch(2)
    assert policy.batch_size(64) == 128


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-3),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=300),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_scaling_composes_with_schedulers(name):
    per_step = name == "onecycle"
    lrs = {}
    for use_policy in (False, True):
        model, gm, opt = make()
        scheduler = SCHEDULERS[name](opt)
        policy = ldbfx.LayerDropBack(gm, opt, kappa=2.0) if use_policy else None
        seen_in_step, after = [], []
        opt.register_step_pre_hook(lambda o, a, k: seen_in_step.append(o.param_groups[0]["lr"]))
        for epoch in range(100):
            if policy:
                policy.start_epoch(epoch)
            for _ in range(3):
                gm(torch.randn(2, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                if policy:
                    policy.step()
                if per_step:
                    scheduler.step()
            if policy:
                policy.end_epoch()
            if not per_step:
                scheduler.step()
            after.append(opt.param_groups[0]["lr"])
        lrs[use_policy] = (seen_in_step, after)
    (plain_in, plain_after), (ldb_in, ldb_after) = lrs[False], lrs[True]
    assert ldb_after == plain_after  # no drift: exactly the scheduler's own values, 100 epochs
    # Inside optimizer.step() (the recording hook runs after the policy's): the scheduler's LR,
    # times kappa in DROP epochs (eq. 4).
    for step, (plain, scaled) in enumerate(zip(plain_in, ldb_in)):
        expected = plain * 2.0 if is_drop_epoch(step // 3, 2) else plain
        assert scaled == pytest.approx(expected, rel=1e-12), step


def test_lr_factor_is_used_by_the_update():
    model, gm, opt = make()
    policy = ldbfx.LayerDropBack(gm, opt, kappa=2.0, drop_rate=0.0)  # drop nothing: same grads
    deltas = []
    for epoch in (1, 2):
        policy.start_epoch(epoch)
        torch.manual_seed(0)
        before = model[0].weight.detach().clone()
        gm(torch.ones(2, 4)).sum().backward()
        grad = model[0].weight.grad.clone()
        opt.step()
        opt.zero_grad()
        policy.step()
        deltas.append(((before - model[0].weight.detach()) / grad).mean().item())
        model[0].weight.data.copy_(before)
        policy.end_epoch()
    assert deltas[0] == pytest.approx(0.1, rel=1e-4) and deltas[1] == pytest.approx(0.2, rel=1e-4)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("lr_scale,factor", [(None, 2.0), ("inverse_keep", 1 / 0.75), (3.0, 3.0)])
def test_lr_scale_options(lr_scale, factor):
    _, gm, opt = make()
    assert ldbfx.LayerDropBack(gm, opt, drop_rate=0.25, lr_scale=lr_scale).lr_factor == pytest.approx(factor)


def test_resume_draws_the_same_masks():
    _, gm, opt = make(24)
    full = []
    policy = ldbfx.LayerDropBack(gm, opt, drop_rate=0.4, period=1, seed=7)
    policy.start_epoch(0)
    policy.end_epoch()
    policy.start_epoch(1)
    for step in range(10):
        full.append(policy.dropped)
        policy.step()
        if step == 3:
            state = policy.state_dict()
    policy.remove()
    resumed = ldbfx.LayerDropBack(gm, opt, drop_rate=0.4, period=1, seed=123)
    resumed.load_state_dict(state)
    tail = []
    for _ in range(6):
        tail.append(resumed.dropped)
        resumed.step()
    assert tail == full[4:]
    assert resumed.stats["steps_drop"] == 10


@pytest.mark.parametrize("kwargs,message", [
    ({"drop_rate": 1.0}, "drop_rate must be in"),
    ({"drop_rate": -0.1}, "drop_rate must be in"),
    ({"period": 0}, "period must be an integer >= 1"),
    ({"kappa": 0.5}, "kappa must be a number >= 1"),
    ({"resample": "batch"}, "resample must be 'step' or 'epoch'"),
    ({"lr_scale": "keep"}, "lr_scale must be"),
    ({"layers": ["0"]}, "not eligible layers"),
])
def test_arguments_are_validated(kwargs, message):
    _, gm, opt = make()
    with pytest.raises(ValueError, match=message):
        ldbfx.LayerDropBack(gm, opt, **kwargs)


def test_step_before_start_epoch_is_an_error():
    _, gm, opt = make()
    with pytest.raises(RuntimeError, match="start_epoch"):
        ldbfx.LayerDropBack(gm, opt).step()


def test_a_state_saved_with_other_settings_is_refused():
    # Before, another drop rate resumed on the old draws, and ChannelDropBack's saved rows landed
    # on other layers (positions among the candidates) when skip_first changed, silently.
    _, gm, opt = make(24)
    state = ldbfx.LayerDropBack(gm, None, drop_rate=0.4, period=1, seed=7).state_dict()
    with pytest.raises(ValueError, match=r"drop_rate=0\.3 \(saved: 0\.4\)"):
        ldbfx.LayerDropBack(gm, None, drop_rate=0.3, period=1).load_state_dict(state)
    with pytest.raises(ValueError, match="candidates="):
        ldbfx.LayerDropBack(gm, None, drop_rate=0.4, period=1, layers=["10", "11"]).load_state_dict(state)
    ldbfx.LayerDropBack(gm, None, drop_rate=0.4, period=1, seed=1).load_state_dict(state)  # the seed may differ
    state = ldbfx.ChannelDropBack(gm, opt, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"skip_first=2 \(saved: 4\)"):
        ldbfx.ChannelDropBack(gm, opt, skip_first=2, seed=0).load_state_dict(state)


def test_one_policy_scales_an_optimizer_and_a_failed_step_leaves_no_scaled_rate():
    # A second policy on the same optimizer (a notebook cell run again) compounded the scaling:
    # the rate grew by kappa at every step. A step that raised left it scaled for good.
    _, gm, opt = make(24)
    policy = ldbfx.LayerDropBack(gm, opt, drop_rate=0.5, period=1, kappa=2)
    with pytest.raises(ValueError, match="remove"):
        ldbfx.LayerDropBack(gm, opt)
    policy.start_epoch(0)
    policy.end_epoch()
    policy.start_epoch(1)  # a DROP epoch: the rate is doubled while the optimizer steps
    seen = []
    hook = opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))

    def explode(o, *_):
        raise RuntimeError("out of memory")

    failing = opt.register_step_pre_hook(explode)
    with pytest.raises(RuntimeError):
        opt.step()
    failing.remove()
    opt.step()
    assert seen == [0.2, 0.2] and opt.param_groups[0]["lr"] == 0.1  # before: [0.2, 0.4], then 0.2
    hook.remove()
    policy.remove()
    ldbfx.LayerDropBack(gm, opt)  # once removed, another may scale it
