"""ldbfx.ops: every handler's function against the plain op, in the eager and the opaque path."""

import pytest
import torch
import torch.nn.functional as F

from contract import saved_bytes
from ldbfx import ops
from ldbfx.state import LdbState


_STATES = []  # the ops reach a mask's model state through a registry of live states


def _mask(n=3, dropped=()):
    state = LdbState(((),) * n)
    state.set_dropped(tuple(dropped))
    _STATES.append(state)
    return state.mask


def _leaves(*shapes, requires_grad=True):
    return [torch.randn(*s, dtype=torch.float64, requires_grad=requires_grad) for s in shapes]


CASES = {
    "linear2d": (lambda x, w, b, m: ops.linear(x, w, b, m, 1), lambda x, w, b: F.linear(x, w, b),
                 [(5, 4), (3, 4), (3,)]),
    "linear3d": (lambda x, w, b, m: ops.linear(x, w, b, m, 1), lambda x, w, b: F.linear(x, w, b),
                 [(2, 5, 4), (3, 4), (3,)]),
    "matmul": (lambda x, w, m: ops.matmul(x, w, m, 1), lambda x, w: x @ w, [(2, 5, 4), (4, 3)]),
    "conv2d_grouped": (
        lambda x, w, b, m: ops.conv(x, w, b, (2, 1), (1, 0), (1, 2), 2, m, 1),
        lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 0), (1, 2), 2), [(2, 4, 7, 6), (6, 2, 3, 2), (6,)]),
    "conv1d": (lambda x, w, b, m: ops.conv(x, w, b, (1,), (1,), (1,), 1, m, 1),
               lambda x, w, b: F.conv1d(x, w, b, 1, 1), [(2, 3, 9), (4, 3, 3), (4,)]),
    "conv3d_depthwise": (lambda x, w, m: ops.conv(x, w, None, (1, 1, 1), (1, 1, 1), (1, 1, 1), 3, m, 1),
                         lambda x, w: F.conv3d(x, w, None, 1, 1, 1, 3), [(1, 3, 4, 5, 5), (3, 1, 3, 3, 3)]),
    "conv2d_unbatched": (lambda x, w, m: ops.conv(x, w, None, (1, 1), (1, 1), (1, 1), 1, m, 1),
                         lambda x, w: F.conv2d(x, w, None, 1, 1), [(3, 5, 5), (2, 3, 3, 3)]),
    "masked_param": (lambda x, p, m: x * ops.masked_param(p, m, 1), lambda x, p: x * p, [(4, 3), (3,)]),
}


def _grads(fn, leaves):
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, [None if t.grad is None else t.grad.clone() for t in leaves]


@pytest.mark.parametrize("opaque", [False, True], ids=["eager", "opaque"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_plain_op(case, opaque):
    fn, ref, shapes = CASES[case]
    leaves = _leaves(*shapes)
    want_out, want = _grads(ref, leaves)
    ctx = ops.compiled_path() if opaque else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with ctx:
        out, kept = _grads(lambda *a: fn(*a, _mask()), leaves)
        _, dropped = _grads(lambda *a: fn(*a, _mask(dropped=[1])), leaves)
    assert torch.equal(out, want_out)
    for got, exp in zip(kept, want):
        torch.testing.assert_close(got, exp)
    # Dropped: the input gradient is unchanged, every parameter gradient is skipped.
    torch.testing.assert_close(dropped[0], want[0])
    for g in dropped[1:]:
        assert g is None if not opaque else (g is None or not g.any())


@pytest.mark.parametrize("opaque", [False, True], ids=["eager", "opaque"])
def test_embedding(opaque):
    weight = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([[1, 0, 3], [3, 3, 9]])
    ref = F.embedding(idx, weight, padding_idx=-1, scale_grad_by_freq=True)
    ref.square().sum().backward()
    want, weight.grad = weight.grad.clone(), None
    with ops.compiled_path() if opaque else torch.enable_grad():
        out = ops.embedding(idx, weight, -1, True, _mask(), 1)
        out.square().sum().backward()
        assert torch.equal(out, ref)
        torch.testing.assert_close(weight.grad, want)
        weight.grad = None
        out = ops.embedding(idx, weight, -1, True, _mask(dropped=[1]), 1)
        if opaque:  # the compiled path's Function yields a zero gradient (cleared before step)
            out.square().sum().backward()
            assert not weight.grad.any()
        else:  # like a frozen weight: nothing upstream needs a gradient, so none is recorded
            assert not out.requires_grad


def test_no_grad_runs_the_plain_op():
    x, w, b = _leaves((5, 4), (3, 4), (3,))
    with torch.no_grad():
        y = ops.linear(x, w, b, _mask(dropped=[1]), 1)
    assert y.grad_fn is None and torch.equal(y, F.linear(x, w, b))


def test_dropped_convolution_saves_what_freezing_saves():
    # A dropped convolution is the plain op on its detached weight: the tensors it saves for
    # backward are those of freezing the weight (its input, its weight), no more, no fewer.
    w = [torch.randn(8, 8, 3, 3, requires_grad=True) for _ in range(4)]
    x = torch.randn(4, 8, 32, 32)

    def net(mask):
        h = x
        for i, wi in enumerate(w):
            h = ops.conv(h, wi, None, (1, 1), (1, 1), (1, 1), 1, mask, i)
        return h

    def frozen():
        h = x
        for i, wi in enumerate(w):
            h = F.conv2d(h, wi.detach() if i in (1, 2) else wi, None, 1, 1)
        return h

    assert saved_bytes(lambda: net(_mask(4, dropped=[1, 2]))) == saved_bytes(frozen)
    assert saved_bytes(lambda: net(_mask(4))) == saved_bytes(lambda: net(_mask(4, dropped=[1, 2])))


def test_dropped_linear_does_not_keep_its_input_alive():
    w = [torch.randn(64, 64, requires_grad=True) for _ in range(4)]
    x = torch.randn(2, 16, 64)

    def net(mask):
        h = x
        for i, wi in enumerate(w):
            h = ops.linear(h, wi, None, mask, i)
        return h

    kept = saved_bytes(lambda: net(_mask(4)))
    dropped = saved_bytes(lambda: net(_mask(4, dropped=[1, 2])))
    assert kept - dropped == 2 * x.numel() * x.element_size()


def test_torch_func_grad_through_a_dropped_convolution():
    # Before: "In order to use an autograd.Function with functorch transforms ... it must override
    # the setup_context staticmethod" whenever a convolution was dropped.
    from torch import nn

    import ldbfx

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(6)])
    gm = ldbfx.transform(model)
    ldbfx.set_dropped(gm, ["4"])
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 5, 5)
    got = torch.func.grad(lambda p: torch.func.functional_call(gm, p, (x,)).square().sum())(params)
    frozen = {n: p.detach() if n.startswith("4.") else p for n, p in params.items()}
    want = torch.func.grad(lambda p: torch.func.functional_call(model, {**frozen, **p}, (x,)).square().sum())(
        {n: p for n, p in params.items() if not n.startswith("4.")})
    for name, g in want.items():
        assert torch.equal(got[name], g), name
    assert not got["4.weight"].any()  # torch.func gives zeros for an unused input


def test_double_backward_in_dense_mode():
    # A gradient penalty (create_graph=True) under DDP's dense mode: the zero gradients of dropped
    # layers are differentiable, and the penalty's gradient equals freezing the same layer.
    from torch import nn

    import ldbfx

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4, 4), nn.Tanh())])
    gm = ldbfx.transform(model)
    ldbfx.distributed.dense_gradients(gm)
    ldbfx.set_dropped(gm, ["8"])

    def penalty_grads(net, frozen):
        for p in frozen:
            p.requires_grad_(False)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (gx,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        grads = torch.autograd.grad(gx.square().sum(), [model[0].weight, model[2].weight])
        for p in frozen:
            p.requires_grad_(True)
        return grads

    got = penalty_grads(gm, [])
    want = penalty_grads(model, [model[8].weight, model[8].bias])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_cpu_conv_backward_kernel_mixed_layouts_and_drops():
    """The CPU compiled path's one-call convolution backward: a gradient arriving contiguous
    beside a channels_last input gives the values of aten's own call, in the fakes' layouts;
    dropped, dW and db are zeros and the skip is recorded."""
    from ldbfx.state import state_of

    torch.manual_seed(0)
    op = torch.ops.ldbfx.conv_backward.default
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    w, grad = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    want = torch.ops.aten.convolution_backward(grad, x.contiguous(), w, [5], *conv[:3], False, [0, 0], 1,
                                               [True, True, True])
    mask = _mask(3)
    got = op(grad, x, w, mask, 1, *conv, True, True, True, False)
    assert got[0].stride() == x.stride() and got[1].stride() == w.stride()
    for g, r in zip(got, want):  # another kernel (channels_last): float64 leaves ~1e-15
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    mask[1] = True
    gx, gw, gb = op(grad, x, w, mask, 1, *conv, True, True, True, False)
    assert not gw.any() and not gb.any() and gw.shape == w.shape and gb.shape == (5,)
    torch.testing.assert_close(gx, want[0], rtol=1e-10, atol=1e-10)
    assert 1 in state_of(mask).skipped


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("dropped", [False, True])
def test_conv_kernels_return_weight_grad_in_the_parameter_layout(kernel_size, dropped):
    """Inductor's layout optimisation hands the kernels a channels_last copy of the weight; with
    ``contiguous_weight_grad`` dW comes back contiguous (what the fake promises and ``.grad``
    holds), so autograd makes no transposing copy, least of all of a dropped layer's zeros."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).to(memory_format=cl)
    w = torch.randn(5, 4, kernel_size, kernel_size, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, 6, dtype=torch.float64).to(memory_format=cl)
    conv = ([1, 1], [kernel_size // 2] * 2, [1, 1], 1)
    want = torch.ops.aten.convolution_backward(grad, x, w, None, *conv[:3], False, [0, 0], 1,
                                               [True, True, False])
    mask = _mask(3)
    mask[1] = dropped
    for name, outputs in (("conv_backward", (True,)), ("conv_weight_grad", ())):
        op = getattr(torch.ops.ldbfx, name).default
        args = (grad, x, w.to(memory_format=cl), mask, 1, *conv, *outputs, True, False, True)
        got = op(*args)
        gw = got[-2]
        assert gw.shape == w.shape and gw.stride() == w.stride(), (name, gw.stride())
        if dropped:
            assert not gw.any()
        else:  # aten on a channels_last copy of the weight: maybe another summation order, ~1e-15 in float64
            torch.testing.assert_close(gw, want[1], rtol=1e-10, atol=1e-10)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
        assert fake[-2].stride() == gw.stride(), name


def test_conv_kernels_give_a_non_dense_weight_a_dense_weight_grad():
    """A weight that is a view (a filter shared by expansion) gets a dense dW with the values of
    aten's call, in the strides the fake promised (Inductor trusts the fake)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(1, 4, 3, 3, dtype=torch.float64).expand(5, 4, 3, 3)
    grad = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    want = torch.ops.aten.convolution_backward(grad, x, w.contiguous(), None, *conv[:3], False, [0, 0], 1,
                                               [True, True, False])
    for name, outputs in (("conv_backward", (True,)), ("conv_weight_grad", ())):
        op = getattr(torch.ops.ldbfx, name).default
        args = (grad, x, w, _mask(3), 1, *conv, *outputs, True, False, False)
        gw = op(*args)[-2]
        with torch._subclasses.FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
        assert gw.stride() == fake[-2].stride() == (36, 9, 3, 1), name
        # An expanded vs a dense weight: maybe another summation order, ~1e-15 apart in float64.
        torch.testing.assert_close(gw, want[1], rtol=1e-10, atol=1e-10)


def test_compiled_path_convolution_double_backward():
    """create_graph=True through the compiled path's convolution (CPU): dX stays differentiable
    (the one-call kernel has no derivative, so a double backward takes aten's dX)."""
    import warnings

    import ldbfx

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64) for _ in range(6)])
    gm = ldbfx.transform(model)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    gx.square().sum().backward()
    want = [p.grad for p in model.parameters()]  # None for biases: dX does not depend on them
    model.zero_grad(set_to_none=True)
    with ops.compiled_path(), warnings.catch_warnings():
        # Backprop through an op without a derivative only warns ("silently incorrect"): an error here.
        warnings.simplefilter("error")
        (gx,) = torch.autograd.grad(gm(x).sum(), x, create_graph=True)
        gx.square().sum().backward()
    assert any(w is not None for w in want)
    for p, w in zip(model.parameters(), want):  # the same aten kernels, float64
        if w is None:  # the compiled path's graph may reach the bias with a zero gradient
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)


def test_contiguous_strides_of_a_symbolic_shape():
    # The fakes ask for dW's strides too; under dynamic parameter shapes a size is a SymInt,
    # which cannot key the cache the kernels use: computed, not cached.
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from ldbfx.ops.kernels import _contiguous_strides

    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(5, source=ConstantSource("n")), hint=5)
    assert _contiguous_strides(torch.Size([n, 3, 2])) == (6, 2, 1) == _contiguous_strides((5, 3, 2))
    assert _contiguous_strides(torch.Size([3, n])) == (n, 1)
