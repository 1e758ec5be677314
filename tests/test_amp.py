"""Mixed precision (bf16 autocast on CPU) and channels_last: kept gradients match the original."""

import pytest
import torch

import ldbfx
from contract import loss_of, pick_dropped, run
from ldbfx import ops
from models import ZOO

CASES = [
    ("tv_resnet18", True), ("tv_mobilenet_v2", True), ("timm_convnext_atto", True),
    ("tv_resnet18", False), ("tv_vit", False), ("timm_vit_tiny", False),
]


def _bf16_close(got, want):
    # bf16 keeps 8 bits of mantissa; different (equally valid) kernels may round differently.
    assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max() + 1e-3


@pytest.mark.parametrize("path", ["eager", "opaque"])
@pytest.mark.parametrize("name,channels_last", CASES)
def test_autocast_bf16(name, channels_last, path):
    make_model, make_input = ZOO[name]
    torch.manual_seed(0)
    model = make_model()
    x = make_input()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    gm = ldbfx.transform(model)
    drop = pick_dropped(gm)

    def grads(module, dropped):
        model.zero_grad(set_to_none=True)
        ldbfx.set_dropped(gm, dropped)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(module, x)
        loss_of(out).backward()
        ldbfx.set_dropped(gm, [])
        return {n: p.grad for n, p in model.named_parameters()}

    want = grads(model, [])
    with ops.compiled_path() if path == "opaque" else torch.enable_grad():
        got = grads(gm, drop)
    dropped = {p for l in drop for p in l.params}
    for n, g in got.items():
        if n in dropped:
            assert g is None or not g.any()
        else:
            assert g is not None and g.dtype == want[n].dtype
            _bf16_close(g, want[n])


def test_fp16_grad_scaler_leaves_dropped_layers_untouched_and_skips_inf_steps():
    # GradScaler.step unscales, then calls optimizer.step (where ldbfx's hook clears the dropped
    # layers' gradients) or skips it on inf/NaN: either way dropped layers and their state stay.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(7)])
    gm = ldbfx.transform(model)
    ldbfx.distributed.dense_gradients(gm)  # zeros instead of None: the hook must clear them
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(4, 8)

    def step(dropped, poison=False):
        ldbfx.set_dropped(gm, dropped)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = gm(x).float().square().mean()
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)  # leaves zeros: the hook, not None, protects the layers

    step([])  # momentum buffers exist from here on
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    step(["5"])
    for p, b, m in zip(model.parameters(), before, momentum):
        untouched = torch.equal(p, b) and torch.equal(opt.state[p]["momentum_buffer"], m)
        assert untouched == (p is model[5].weight or p is model[5].bias)
    scale = scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    step([], poison=True)  # inf: the step is skipped, the scale backs off
    assert scaler.get_scale() < scale
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("path", ["eager", "opaque"])
def test_a_skipped_fp16_step_leaves_no_skip_record_behind(path):
    # GradScaler skips optimizer.step() on inf/NaN, so ldbfx's hook does not run and the record of
    # what that backward skipped stays (in Python, or in the native kernels' bytes). Unless
    # discard_skipped forgets it with the gradients, the next step leaves layer 4 untouched
    # although nothing is dropped then.
    x = torch.randn(4, 8)
    for discard in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(7)])
        gm = ldbfx.transform(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

        def step(dropped, poison=False):
            ldbfx.set_dropped(gm, dropped)
            with ops.compiled_path() if path == "opaque" else torch.enable_grad():
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = gm(x).float().square().mean()
                scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
            scaler.step(opt)
            scaler.update()

        step(["4"], poison=True)
        if discard:
            ldbfx.discard_skipped(gm)
            assert not gm.ldbfx_state.skipped
        opt.zero_grad()
        before = model[4].weight.detach().clone()
        step([])
        assert torch.equal(model[4].weight, before) != discard, discard  # trains once discarded
