"""torch.compile (Inductor on CPU): one compile for any sequence of masks, no graph break."""

import copy
import random

import pytest
import torch
import torchvision
from torch._dynamo.testing import CompileCounterWithBackend
from torchvision.models.vision_transformer import VisionTransformer

import ldbfx

CASES = {
    "cnn": (lambda: torchvision.models.resnet18(num_classes=10), lambda: torch.randn(4, 3, 32, 32)),
    "transformer": (
        lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                  hidden_dim=64, mlp_dim=128, num_classes=10),
        lambda: torch.randn(4, 3, 32, 32),
    ),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(got, want):
    # Compiled and eager kernels round differently: compare relative to the gradient's scale
    # (plain torch.compile of the untransformed model differs by ~2e-4 of the max on ResNet-18).
    assert (got - want).abs().max() <= 2e-3 * want.abs().max() + 1e-6


def _compiled_and_eager_grads(model, gm, compiled, x):
    """The gradients of one compiled step and of the eager reference (the same mask and rows)."""
    model.zero_grad(set_to_none=True)
    compiled(x).square().mean().backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    gm(x).square().mean().backward()
    return got, _grads(model)


def _check_against_eager(model, gm, compiled, x, drop):
    """One step with ``drop`` dropped: the compiled gradients equal the eager ones, and the
    dropped layers' are zeros (eager: none) until the optimizer hook clears them."""
    ldbfx.set_dropped(gm, drop)
    got, want = _compiled_and_eager_grads(model, gm, compiled, x)
    for name in {p for l in drop for p in l.params}:
        assert not got[name].any(), f"{name}: a dropped layer's compiled gradient is zero"
        assert name not in want
    for name, g in want.items():
        _close(got[name], g)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_training_with_changing_masks(case):
    make_model, make_input = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    gm = ldbfx.transform(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)  # fullgraph: no graph break
    x = make_input()
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    rng = random.Random(0)
    masks = [[l for l in eligible if rng.random() < 0.5] for _ in range(10)]
    for drop in masks:
        _check_against_eager(model, gm, compiled, x, drop)
    assert counter.frame_count == 1, "changing the mask must not recompile"

    # Optimizer semantics under compile: the zero gradients of dropped layers become None
    # before the step, so SGD (momentum, weight decay) and AdamW leave them bit-for-bit alone.
    for make_opt in (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-2),
                     lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2)):
        opt = make_opt(model.parameters())
        ldbfx.set_dropped(gm, [])
        for _ in range(2):
            opt.zero_grad()
            compiled(x).square().mean().backward()
            opt.step()
        drop = masks[0]
        ldbfx.set_dropped(gm, drop)
        params = dict(model.named_parameters())
        names = [p for l in drop for p in l.params]
        before = {n: params[n].detach().clone() for n in names}
        state = {n: copy.deepcopy(opt.state[params[n]]) for n in names}
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()
        for n in names:
            assert params[n].grad is None
            assert torch.equal(params[n], before[n]), n
            for key, value in state[n].items():
                assert torch.equal(torch.as_tensor(opt.state[params[n]][key]), torch.as_tensor(value))
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_channel_dropback_one_compile(case):
    make_model, make_input = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    gm = ldbfx.transform(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    x = make_input()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-2)
    policy = ldbfx.ChannelDropBack(gm, opt, channel_rate=0.5, seed=0)  # one layer every step
    params = dict(model.named_parameters())
    policy.start_epoch(0)
    for _ in range(4):
        frozen = policy.frozen
        assert frozen, "the draw selects some layers"
        got, want = _compiled_and_eager_grads(model, gm, compiled, x)  # eager: the same slices
        for name, g in want.items():
            _close(got[name], g)
        layer = next(iter(frozen))
        weight = next(p for p in ldbfx.layers(gm)[gm.ldbfx_capture.layer_index[layer]].params if params[p].dim() >= 2)
        assert not got[weight][frozen[layer]].any()
        before = params[weight].detach()[frozen[layer]].clone()
        opt.step()
        assert torch.equal(params[weight].detach()[frozen[layer]], before)
        policy.step()
    assert counter.frame_count == 1, "changing the frozen slices must not recompile"


@pytest.mark.slow
def test_learn_and_drop_compiled_head_matches_eager():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm = ldbfx.transform(model)
    policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0, cache="memory", num_samples=4, compile_head=True)
    policy.freeze_units(4)  # a cut inside layer1.1: two tensors cross it
    x, idx = torch.randn(4, 3, 16, 16), torch.arange(4)
    for _ in range(2):  # fill the cache, then hit it
        model.zero_grad(set_to_none=True)
        out = policy.forward(x, idx)
        out.square().mean().backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        want_out = gm(x)
        want_out.square().mean().backward()
        want = _grads(model)
        _close(out.detach(), want_out.detach())
        assert got.keys() == want.keys() and "conv1.weight" not in got
        for name, g in want.items():
            _close(got[name], g)


def test_mask_reading_ops_are_kept_out_of_cuda_graphs():
    # Each ldbfx custom op reads the CPU mask on the host to choose its kernels: one recorded in
    # a CUDA graph (mode="reduce-overhead") would replay a stale choice. The tag is what makes
    # Inductor leave them out; tests/test_cuda.py checks the gradients on a GPU.
    from ldbfx.ops.kernels import KERNELS

    for mechanism, kernels in KERNELS.items():
        for name, op in kernels.items():
            assert torch.Tag.cudagraph_unsafe in op.tags, (mechanism, name)


def test_convolution_kernels_get_the_layout_constraint_of_aten_convolution_backward():
    # Without it Inductor realises some incoming gradients contiguous beside channels_last
    # inputs (10 of ResNet-50's 53 convolutions), and each costs an activation-sized copy in the
    # kernel (docs/design.md, "The compiled path: mechanisms compared").
    from torch._library.utils import get_layout_constraint_tag

    from ldbfx.ops.kernels import KERNELS

    for mechanism, kernels in KERNELS.items():
        for name, op in kernels.items():
            op = getattr(op, "_opoverload", op)
            want = torch.Tag.needs_fixed_stride_order if name.startswith("conv") else torch.Tag.flexible_layout
            assert get_layout_constraint_tag(op) == want, (mechanism, name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_backward_asks_for_weight_grads_in_the_parameter_layout(channels_last):
    # _Conv.backward decides, when traced, the layout the kernels return dW in: the parameter's
    # (contiguous unless the model was made channels_last), not that of the weight copy Inductor
    # may save. Read off the backward graph AOTAutograd hands its compiler.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep_backward(gm, _):
        graphs.append(gm.graph)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(7)])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gm = ldbfx.transform(model)
    torch.compile(gm, backend=backend)(torch.randn(2, 3, 5, 5)).sum().backward()
    flags = [node.args[-1] for graph in graphs for node in graph.nodes
             if node.op == "call_function" and str(node.target).startswith("ldbfx.conv")]
    assert len(flags) == 7 and all(flag is (not channels_last) for flag in flags), flags


class _Sequence(torch.nn.Module):
    """Token-wise linears, a norm and a 1-D convolution over a sequence of any length."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(6))
        self.norm = torch.nn.LayerNorm(16)
        self.mix = torch.nn.Conv1d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + torch.relu(block(h))
        h = self.mix(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.head(h).mean(1)


def test_dynamic_shapes_one_compile_for_any_length_and_mask():
    # Batches of text come in many lengths: with dynamic shapes the kernels' fakes must take
    # symbolic sizes, and one compile serve every length and mask.
    torch.manual_seed(0)
    model = _Sequence()
    gm = ldbfx.transform(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter, dynamic=True, fullgraph=True)
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    for step, length in enumerate((5, 7, 9, 6)):
        drop = eligible[step % 3::3]
        _check_against_eager(model, gm, compiled, torch.randn(3, length, 8), drop)
    assert counter.frame_count == 1, "new lengths and masks must not recompile"


def test_compiled_path_mechanisms_agree():
    # The mechanisms (C++ kernels, the default where they build; Library.define/impl with
    # Python bodies) make the same aten calls: the gradients are those of the
    # same kernels, bitwise.
    from ldbfx.ops import native, path

    disabled = not native.available() and native.reason.startswith("LDBFX_NATIVE=")
    mechanisms = [m for m in path.MECHANISMS if m != "native" or not disabled]
    if not disabled:  # a build failure must show in CI, not skip quietly
        assert native.available(), (f"the C++ kernels did not build ({native.reason}): install a C++ "
                                    "compiler, or run the tests with LDBFX_NATIVE=0")

    model, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)
    drop = [l for l in ldbfx.layers(ldbfx.transform(model)) if l.eligible][::3]
    grads = {}
    for mechanism in mechanisms:
        gm = ldbfx.transform(model)
        ldbfx.set_dropped(gm, drop)
        with path.using_mechanism(mechanism):
            model.zero_grad(set_to_none=True)
            torch.compile(gm, backend="aot_eager", fullgraph=True)(x).square().mean().backward()
        # Only the C++ kernels write the skip record beside the mask: they did run.
        assert bool(gm.ldbfx_state._native_record.any()) is (mechanism == "native")
        grads[mechanism] = _grads(model)
        assert all(not grads[mechanism][name].any() for l in drop for name in l.params)  # zeros until step()
    library = grads["library"]
    for other in (m for m in mechanisms if m != "library"):
        assert library.keys() == grads[other].keys()
        assert all(torch.equal(library[n], grads[other][n]) for n in library), other
    with pytest.raises(ValueError, match="unknown compiled-path mechanism"):
        path.using_mechanism("cond")


def _convolution_backward_calls(step, tmp_path) -> list:
    """Every ``aten.convolution_backward`` one call of ``step`` makes, compiled code and ldbfx's
    kernels alike, as the profiler records them: the operands' shapes and strides (those of
    size-1 dimensions left out: they address nothing, and may differ for the same layout) and
    which gradients it computes. (A TorchDispatchMode would not do: under one, torch.compile runs
    the model eagerly.)"""
    import json

    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        step()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    calls = []
    for event in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]:
        if event.get("name") == "aten::convolution_backward":
            args = event["args"]
            if "Input Strides" not in args or "Concrete Inputs" not in args:
                pytest.skip("this torch build's profiler records no strides or concrete inputs")
            layouts = tuple((tuple(shape), tuple(s for s, n in zip(strides, shape) if n != 1))
                            for shape, strides in zip(args["Input Dims"][:3], args["Input Strides"][:3]))
            calls.append((*layouts, args["Concrete Inputs"][-1]))  # output_mask, e.g. "[True, False, False]"
    return sorted(calls)


@pytest.mark.slow
def test_compiled_path_runs_the_convolution_backward_of_the_untransformed_model_or_freezing(tmp_path):
    # What makes the compiled path cost no more than the model it replaces: its kernels hand
    # oneDNN the same operands in the same layouts as Inductor does in the untransformed model
    # (nothing dropped), and a dropped convolution asks for what a frozen one does (dX only).
    # A layout copy or a dW computed for nothing shows here as a differing call.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm = ldbfx.transform(model)
    drop = [l for l in ldbfx.layers(gm) if l.eligible][::3]
    x = torch.randn(4, 3, 32, 32)
    plain, transformed = torch.compile(model), torch.compile(gm)

    def step(module):
        def run():
            model.zero_grad(set_to_none=True)
            module(x).square().mean().backward()
        run()  # compile first, outside the recording
        return _convolution_backward_calls(run, tmp_path)

    full = step(plain)
    assert len(full) == 20 and step(transformed) == full
    ldbfx.set_dropped(gm, drop)
    dropped = step(transformed)
    for name in (p for l in drop for p in l.params):
        model.get_parameter(name).requires_grad_(False)
    assert dropped == step(plain)  # freezing, compiled for that mask
    dropped_convolutions = sum(model.get_parameter(l.params[0]).dim() == 4 for l in drop)
    assert sum(call[-1] == "[True, False, False]" for call in dropped) == dropped_convolutions > 0  # dX only
