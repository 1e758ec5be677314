"""set_dropped: names, errors, no retrace, optimizer semantics, eval, accumulation."""

import pytest
import torch
from torch import nn

import ldbfx
from contract import assert_close_to_scale


def make():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(8)])
    return model, ldbfx.transform(model)


def test_names_indices_and_records_are_accepted():
    _, gm = make()
    ldbfx.set_dropped(gm, ["4", 5, ldbfx.layers(gm)[6]])
    assert ldbfx.dropped(gm) == ("4", "5", "6")
    ldbfx.set_dropped(gm, [-2])  # negative indices count from the end
    assert ldbfx.dropped(gm) == ("6",)
    ldbfx.set_dropped(gm, [])
    assert ldbfx.dropped(gm) == ()


def test_unknown_name_lists_the_valid_ones():
    _, gm = make()
    with pytest.raises(ldbfx.LayerNotFoundError, match=r"no eligible layer named 'conv'.*: 4, 5, 6"):
        ldbfx.set_dropped(gm, ["conv"])
    with pytest.raises(ldbfx.LayerNotFoundError, match=r"'0' \(index 0\) may not be dropped \(first 4\)"):
        ldbfx.set_dropped(gm, [0])
    with pytest.raises(ldbfx.LayerNotFoundError):
        ldbfx.set_dropped(gm, [99])
    with pytest.raises(TypeError, match="str or int"):
        ldbfx.set_dropped(gm, [4.0])
    assert isinstance(ldbfx.LayerNotFoundError("x"), KeyError)  # catchable like a missing key


def test_mask_changes_without_retrace():
    model, gm = make()
    graph, code, forward = gm.graph, gm.code, type(gm).forward
    for drop in (["4"], ["5", "6"], []):
        ldbfx.set_dropped(gm, drop)
        model.zero_grad(set_to_none=True)
        gm(torch.randn(3, 6)).sum().backward()
        assert {n for n in ("4", "5", "6") if model[int(n)].weight.grad is None} == set(drop)
    assert gm.graph is graph and gm.code == code and type(gm).forward is forward


def test_zero_grad_without_set_to_none_still_leaves_dropped_layers_untouched():
    model, gm = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        gm(torch.randn(3, 6)).sum().backward()
        opt.step()
    ldbfx.set_dropped(gm, ["5"])
    before = model[5].weight.detach().clone()
    momentum = opt.state[model[5].weight]["momentum_buffer"].clone()
    opt.zero_grad(set_to_none=False)  # leaves a zero .grad that weight decay would act on
    gm(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert torch.equal(model[5].weight, before)
    assert torch.equal(opt.state[model[5].weight]["momentum_buffer"], momentum)


def test_eval_and_no_grad_ignore_the_mask():
    model, gm = make()
    x = torch.randn(3, 6)
    ldbfx.set_dropped(gm, ["4", "5", "6"])
    gm.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(x), model(x))


def test_gradient_accumulation_with_a_fixed_mask():
    model, gm = make()
    xs = [torch.randn(3, 6) for _ in range(2)]
    for x in xs:
        model(x).sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ldbfx.set_dropped(gm, ["5"])
    for x in xs:  # the mask stays fixed over the accumulation window
        gm(x).sum().backward()
    for n, p in model.named_parameters():
        if n.startswith("5."):
            assert p.grad is None
        else:  # layers after "5" see dX from a frozen-weight backward: compared on scale
            assert_close_to_scale(p.grad, full[n], what=n)


def test_set_dropped_requires_a_transformed_model():
    with pytest.raises(TypeError, match="ldbfx.transform"):
        ldbfx.set_dropped(nn.Linear(2, 2), [])


def test_manual_cuda_graph_capture_is_refused(monkeypatch):
    # Replaying a captured graph would repeat the capture step's host-side drop decisions, with
    # whatever mask is set later: silently frozen masks. Capture is simulated (no GPU needed).
    _, gm = make()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ldbfx.LdbfxError, match="CUDA-graph capture.*freeze the masks"):
        gm(torch.randn(3, 6))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert gm(torch.randn(3, 6)).shape == (3, 6)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)


@pytest.mark.parametrize("path", ["eager", "dense", "compiled-path", "compile"])
def test_optimizer_skips_what_the_backward_skipped_not_what_the_mask_says_now(path):
    # The mask changes between backward() and optimizer.step() (user code, a callback, a policy
    # stepped early). Before: eager threw away layer 6's real gradient, and in the compiled or
    # dense path weight decay and momentum moved layer 5, which that backward had skipped.
    import contextlib

    from ldbfx import ops

    model, gm = make()
    if path == "dense":
        ldbfx.distributed.dense_gradients(gm)
    net = torch.compile(gm, backend="aot_eager") if path == "compile" else gm
    context = ops.compiled_path if path == "compiled-path" else contextlib.nullcontext
    opt = _sgd(model)
    x = torch.randn(3, 6)
    with context():
        net(x).square().sum().backward()  # a full step first: momentum everywhere
        opt.step()
        opt.zero_grad(set_to_none=False)  # zeros stay: only the hook protects skipped layers
        ldbfx.set_dropped(gm, ["5"])
        net(x).square().sum().backward()
    ldbfx.set_dropped(gm, ["6"])  # changed before the step
    before = {i: (model[i].weight.detach().clone(), opt.state[model[i].weight]["momentum_buffer"].clone())
              for i in (5, 6)}
    opt.step()
    assert torch.equal(model[5].weight, before[5][0])  # skipped by that backward: untouched
    assert torch.equal(opt.state[model[5].weight]["momentum_buffer"], before[5][1])
    assert not torch.equal(model[6].weight, before[6][0])  # kept by it: trained on its gradient
    assert not gm.ldbfx_state.skipped  # the record is consumed by the step


def test_two_optimizers_each_skip_their_own_layers():
    # A GAN-like split: each optimizer's step clears only the skipped layers it holds, and the
    # other optimizer still finds its own in the record.
    model, gm = make()
    first, second = (torch.optim.SGD([p for i, m in enumerate(model) if (i < 5) == half for p in m.parameters()],
                                     lr=0.1, momentum=0.9, weight_decay=0.1) for half in (True, False))
    x = torch.randn(3, 6)
    gm(x).square().sum().backward()
    first.step(), second.step()
    first.zero_grad(set_to_none=False), second.zero_grad(set_to_none=False)
    ldbfx.set_dropped(gm, ["4", "6"])
    gm(x).square().sum().backward()
    before = {i: model[i].weight.detach().clone() for i in (4, 6)}
    first.step()
    assert gm.ldbfx_state.skipped == {6}
    second.step()
    assert all(torch.equal(model[i].weight, before[i]) for i in (4, 6))
    assert not gm.ldbfx_state.skipped


@pytest.mark.parametrize("split", ["two optimizers", "frozen bias"])
def test_a_layer_split_between_optimizers_trains_again_once_kept(split):
    # Layer 5's weight and bias are stepped by two optimizers (Muon for matrices, AdamW for the
    # rest), or its bias is frozen and the optimizer holds only the weight. Before, no single
    # optimizer held the whole layer, so it never left the record: once dropped, it stayed
    # frozen for the rest of training.
    model, gm = make()
    weights = [m.weight for m in model]
    if split == "frozen bias":
        model[5].bias.requires_grad_(False)
        optimizers = [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)]
    else:
        optimizers = [torch.optim.SGD(weights, lr=0.1), torch.optim.SGD([m.bias for m in model], lr=0.1)]
    x = torch.randn(3, 6)

    def step(dropped):
        ldbfx.set_dropped(gm, dropped)
        gm(x).square().sum().backward()
        before = (model[5].weight.detach().clone(), model[5].bias.detach().clone())
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        return [not torch.equal(new, old) for new, old in zip((model[5].weight, model[5].bias), before)]

    assert step(["5"]) == [False, False]
    assert not gm.ldbfx_state.skipped  # each trainable parameter cleared once: the layer left
    assert step([]) == [True, split == "two optimizers"]


def test_deepcopy_with_dropped_layers_has_its_own_state_and_keeps_them_untouched():
    import copy

    model, gm = make()
    ldbfx.set_dropped(gm, ["5"])
    twin = copy.deepcopy(gm)
    assert ldbfx.dropped(twin) == ("5",)
    assert twin.ldbfx_state is not gm.ldbfx_state and twin.ldbfx_state.id != gm.ldbfx_state.id
    assert twin.ldbfx_state.mask is twin._ldbfx_mask  # the copy's graph reads the copy's mask
    opt = _sgd(twin)
    x = torch.randn(3, 6)
    ldbfx.set_dropped(twin, [])
    twin(x).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    ldbfx.set_dropped(twin, ["5"])
    twin(x).square().sum().backward()
    layer = twin.get_submodule("5")
    before = layer.weight.detach().clone()
    opt.step()
    assert torch.equal(layer.weight, before)  # before: the copy's optimizer moved it
    assert ldbfx.dropped(gm) == ("5",) and model[5].weight.grad is None  # the original is apart


def test_the_ops_mask_read_sees_every_write_and_reads_another_tensor_itself():
    # The ops read the mask through a NumPy view of its memory (a hot-path shortcut): it must
    # never lag behind the tensor, whoever writes it.
    _, gm = make()
    state = gm.ldbfx_state
    for drop in (["5"], ["4", "6"], []):
        ldbfx.set_dropped(gm, drop)
        assert [state.is_dropped(state.mask, i) for i in range(8)] == state.mask.tolist()
    state.mask[6] = True  # an in-place write that is not set_dropped's
    assert state.is_dropped(state.mask, 6)
    other = torch.zeros_like(state.mask)  # not the state's mask: read itself, not the view
    assert not state.is_dropped(other, 6)
    other[6] = False
    other[5] = True
    assert state.is_dropped(other, 5) and not state.is_dropped(state.mask, 5)


def test_the_mask_is_on_the_cpu_whatever_the_default_device():
    # ldbfx's CLI transforms a meta-device model to count layers; a mask created on the default
    # device would be meta there (and on a GPU under set_default_device: a sync per read).
    with torch.device("meta"):
        gm = ldbfx.transform(nn.Sequential(*[nn.Linear(6, 6) for _ in range(8)]))
    state = gm.ldbfx_state
    assert state.mask.device.type == state.branch_mask.device.type == "cpu"
    ldbfx.set_dropped(gm, ["5"])
    assert state.is_dropped(state.mask, 5) and not state.is_dropped(state.mask, 4)
