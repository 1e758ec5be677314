"""One helper that checks the whole core contract on a model (FX's ``_run_and_test`` habit)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldbfx


def flatten(out) -> list[torch.Tensor]:
    """Tensors of a nested output (tuples, lists, dicts, namedtuples), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    return []


def loss_of(out) -> torch.Tensor:
    return sum(t.float().square().mean() for t in flatten(out) if t.is_floating_point())


def assert_outputs_equal(a, b) -> None:
    ta, tb = flatten(a), flatten(b)
    assert len(ta) == len(tb) and ta, "outputs differ in structure"
    for x, y in zip(ta, tb):
        assert torch.equal(x, y), f"outputs differ: max abs diff {(x.float() - y.float()).abs().max()}"


def backward_flops(fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of the backward pass only (forward runs outside the counter)."""
    loss = fn()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def run(model, inputs):
    if isinstance(inputs, dict):  # keyword inputs (Hugging Face models)
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def check_outputs(model, gm, inputs) -> None:
    """Same outputs bit for bit in train mode (same RNG) and eval mode."""
    model.train(), gm.train()
    torch.manual_seed(0)
    ref = run(model, inputs)
    torch.manual_seed(0)
    out = run(gm, inputs)
    assert_outputs_equal(ref, out)
    model.eval(), gm.eval()
    with torch.no_grad():
        assert_outputs_equal(run(model, inputs), run(gm, inputs))
    assert_outputs_equal(run(model, inputs), run(gm, inputs))  # eval with grad enabled
    model.train(), gm.train()


def check_eligibility(gm, keep_first: int = 4, keep_last: int = 1) -> None:
    layers = ldbfx.layers(gm)
    assert [l.index for l in layers] == list(range(len(layers)))
    trainable = [l for l in layers if l.reason != "frozen"]  # the rule counts trainable layers
    for position, layer in enumerate(trainable):
        expected = keep_first <= position < len(trainable) - keep_last
        assert layer.eligible == expected, layer
    assert all(not l.eligible for l in layers if l.reason == "frozen")
    all_params = [p for l in layers for p in l.params]
    assert len(all_params) == len(set(all_params)), "a parameter belongs to two layers"


def check_flops(model, gm, inputs, rel: float = 0.01) -> tuple[int, int, int]:
    """All eligible dropped == requires_grad off on the same parameters (±rel)."""
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    names = {p for l in eligible for p in l.params}
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    full = backward_flops(lambda: loss_of(run(model, inputs)))
    for n in names:
        params[n].requires_grad_(False)
    try:
        model.zero_grad(set_to_none=True)
        frozen = backward_flops(lambda: loss_of(run(model, inputs)))
    finally:
        for n in names:
            params[n].requires_grad_(True)
    ldbfx.set_dropped(gm, eligible)
    try:
        model.zero_grad(set_to_none=True)
        dropped = backward_flops(lambda: loss_of(run(gm, inputs)))
    finally:
        ldbfx.set_dropped(gm, [])
    assert abs(dropped - frozen) <= rel * frozen, (full, frozen, dropped)
    return full, frozen, dropped


def pick_dropped(gm, fraction: float = 0.5, seed: int = 0) -> list[ldbfx.Layer]:
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    rng = random.Random(seed)
    chosen = [l for l in eligible if rng.random() < fraction]
    return chosen or eligible[:1]


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4, what: str = "") -> None:
    """``|got - want| <= rel * max|want|`` elementwise (plus a denormal floor).

    For comparisons across *different* kernels or algorithms (a full backward vs one where some
    weights need no gradient, one process vs two ranks): each may sum in its own order, so fp32
    results differ by a few ulps of the largest terms, not of each entry. A per-entry relative
    tolerance fails on small entries (seen: 1.4e-2 relative on a 5e-6 difference, an AMD EPYC CPU);
    a tolerance on the tensor's scale does not, and still catches any real error, which is of the
    order of the entries themselves.
    """
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    bound = rel * want.detach().abs().max().item() + 1e-30
    diff = (got.detach() - want.detach()).abs().max().item()
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g} (rel {rel} of the tensor's scale)"


def _frozen_backward(model, inputs, frozen: set[str], runner=None) -> dict[str, torch.Tensor | None]:
    """Gradients of the original model with ``frozen`` parameters at ``requires_grad=False``
    (computed by ``runner``, a module over the same parameters, when given)."""
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss_of(run(runner or model, inputs)).backward()
        return grads(model)
    finally:
        for n in frozen:
            params[n].requires_grad_(True)


def check_gradients(model, gm, inputs, drop: Sequence[ldbfx.Layer], rel: float = 1e-4,
                    reference=None) -> None:
    """Kept gradients equal freezing the dropped layers, bit for bit; dropped ones are None.

    Exactness is defined against the semantic reference: the original model with the dropped
    layers' parameters frozen (``requires_grad=False``). It runs the same kernels with the same
    arguments as ldbfx (autograd picks its convolution-backward kernel by which gradients are
    needed), so equality is bitwise on any machine. The full backward of the original runs other
    kernels for the dropped layers' input gradients; it is compared with a tolerance on each
    tensor's scale (see :func:`assert_close_to_scale`).

    ``reference``: the module whose kernels ldbfx's graph runs, when not ``model``'s own. A
    torch.export graph is not always op for op the model's eager code (Hugging Face builds an
    explicit attention mask under tracing where eager passes ``is_causal``), so for the export
    front end the reference is the untransformed exported program over the same parameters.
    """
    dropped = {p for l in drop for p in l.params}
    full = _frozen_backward(model, inputs, set())
    frozen = _frozen_backward(model, inputs, dropped, runner=reference)
    model.zero_grad(set_to_none=True)
    ldbfx.set_dropped(gm, drop)
    try:
        torch.manual_seed(0)
        loss_of(run(gm, inputs)).backward()
    finally:
        ldbfx.set_dropped(gm, [])
    got = grads(model)
    for name, g in got.items():
        if name in dropped:
            assert g is None, f"dropped parameter {name} has a gradient"
        elif full[name] is not None:
            assert g is not None, f"kept parameter {name} lost its gradient"
            assert torch.equal(g, frozen[name]), (
                f"{name}: differs from freezing the dropped layers, max abs diff "
                f"{(g - frozen[name]).abs().max():.3g}")
            assert_close_to_scale(g, full[name], rel, what=name)


def check_optimizer(model, gm, inputs, drop: Sequence[ldbfx.Layer], make_optimizer) -> None:
    """optimizer.step() leaves dropped parameters and their state bit-for-bit unchanged."""
    opt = make_optimizer(model.parameters())
    for _ in range(2):  # build optimizer state (momentum, Adam moments) first
        opt.zero_grad()
        loss_of(run(gm, inputs)).backward()
        opt.step()
    dropped = {p for l in drop for p in l.params}
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in dropped}
    state_before = {n: copy.deepcopy(opt.state[params[n]]) for n in dropped}
    kept_before = {n: p.detach().clone() for n, p in params.items() if n not in dropped}
    ldbfx.set_dropped(gm, drop)
    try:
        opt.zero_grad()
        loss_of(run(gm, inputs)).backward()
        opt.step()
    finally:
        ldbfx.set_dropped(gm, [])
    assert all(torch.isfinite(p).all() for p in params.values()), "training diverged: lower the lr"
    for n in dropped:
        assert torch.equal(params[n], before[n]), f"dropped parameter {n} moved"
        for key, value in state_before[n].items():
            now = opt.state[params[n]][key]
            assert torch.equal(torch.as_tensor(now), torch.as_tensor(value)), f"state {key} of {n} moved"
    assert any(not torch.equal(params[n], v) for n, v in kept_before.items()), "nothing trained"


def check_all(make_model, inputs, *, flops: bool = True, **transform_kwargs) -> ldbfx.LdbGraphModule:
    torch.manual_seed(0)
    model = make_model()
    model.train()
    gm = ldbfx.transform(model, **transform_kwargs)
    gm.graph.lint()
    assert list(gm.state_dict()) == list(model.state_dict())
    check_outputs(model, gm, inputs)
    check_eligibility(gm, transform_kwargs.get("keep_first", 4), transform_kwargs.get("keep_last", 1))
    if flops:
        check_flops(model, gm, inputs)
    drop = pick_dropped(gm)
    check_gradients(model, gm, inputs, drop)
    check_optimizer(model, gm, inputs, drop,
                    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-2))
    check_optimizer(model, gm, inputs, drop, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2))
    return gm
