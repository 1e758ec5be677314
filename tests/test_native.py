"""The native (C++) kernels of the compiled path: the Python kernels' results, strides and
records, the Python kernels wherever they cannot decide, and a loud fallback when they do not build."""

import subprocess
import sys

import pytest
import torch

from ldbfx.ops import kernels, native, path
from ldbfx.state import LdbState, RowSelection

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.reason}")

_STATES = []  # keeps the states of the masks below alive (the ops look them up)


def _state(n=3):
    state = LdbState(((),) * n)
    _STATES.append(state)
    return state


def _pair(name):
    return kernels.KERNELS["library"][name], kernels.KERNELS["native"][name]


def _same(got, want):
    # The same aten calls on the same operands: the same bytes, and the fake's strides.
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype
        assert torch.equal(g, w)


def _conv_case(channels_last, kernel_size, grouped=False):
    torch.manual_seed(0)
    # grouped: 2 groups, stride 2, dilation 2 (depthwise-like convolutions and downsampling)
    groups, step, dilation = (2, 2, 2) if grouped else (1, 1, 1)
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4 // groups, kernel_size, kernel_size)
    padding = dilation * (kernel_size // 2)
    out = (8 + 2 * padding - dilation * (kernel_size - 1) - 1) // step + 1
    grad = torch.randn(2, 6, out, out)
    if channels_last:  # what Inductor's layout optimisation hands the kernel; grad left contiguous
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return grad, x, w, ([step] * 2, [padding] * 2, [dilation] * 2, groups)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("wanted", [(True, True, True), (True, True, False), (False, True, True),
                                    (True, False, False)])
@pytest.mark.parametrize("contiguous_weight_grad", [True, False])
def test_conv_backward_matches_the_python_kernel(channels_last, kernel_size, wanted, contiguous_weight_grad):
    _check_conv(_conv_case(channels_last, kernel_size), wanted, contiguous_weight_grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_strided_dilated_conv_backward_matches_the_python_kernel(channels_last):
    _check_conv(_conv_case(channels_last, 3, grouped=True), (True, True, True), False)


def _check_conv(case, wanted, contiguous_weight_grad):
    grad, x, w, conv = case
    # conv_backward (the CPU path: dX too), conv_weight_grad (CUDA's: dW and db only)
    for name, flags in (("conv_backward", wanted), ("conv_weight_grad", wanted[1:])):
        python, cpp = _pair(name)
        args = (*conv, *flags, contiguous_weight_grad)
        fake = kernels._SCHEMAS[name][2](grad, x, w, None, 1, *args)  # what Inductor plans for
        for dropped in (False, True):
            results, records = [], []
            for op in (python, cpp):
                state = _state()
                state.set_dropped((1,) if dropped else ())
                results.append(op(grad, x, w, state.mask, 1, *args))
                records.append(set(state.skipped))
            _same(results[1], results[0])
            assert [r.stride() for r in results[1]] == [f.stride() for f in fake]
            assert records[0] == records[1] == ({1} if dropped else set())


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: autocast's gradients
def test_linear_weight_grad_and_masked_grad_match_the_python_kernels(with_bias, dtype):
    torch.manual_seed(0)
    grad2d, x2d = torch.randn(6, 5, dtype=dtype), torch.randn(6, 4, dtype=dtype)
    for dropped in (False, True):
        for name, args in (("linear_weight_grad", (grad2d, x2d)), ("masked_grad", (grad2d,))):
            results, records = [], []
            for op in _pair(name):
                state = _state()
                state.set_dropped((2,) if dropped else ())
                extra = (with_bias,) if name == "linear_weight_grad" else ()
                out = op(*args, state.mask, 2, *extra)
                results.append(out if isinstance(out, tuple) else (out,))
                records.append(set(state.skipped))
            _same(results[1], results[0])
            assert records[0] == records[1] == ({2} if dropped else set())


def test_record_is_merged_once_and_consumed():
    _, cpp = _pair("masked_grad")
    state = _state()
    state.set_dropped((0, 2))
    for index in (0, 1, 2):
        cpp(torch.ones(3), state.mask, index)
    assert state._native_record.tolist() == [True, False, True]  # written by C++, not Python
    assert state.skipped == {0, 2}
    assert not state._native_record.any()  # moved into the record, not counted twice
    state.skipped.clear()
    assert state.skipped == set()


def test_row_selections_and_foreign_masks_run_the_python_kernels():
    # The C++ bodies know no row selection (ChannelDropBack): a layer with one goes through the
    # Python kernel, which computes dW for the kept rows only.
    from ldbfx.ops.rows import rows_in_use

    rows_in_use()
    python, cpp = _pair("linear_weight_grad")
    torch.manual_seed(0)
    grad2d, x2d = torch.randn(6, 5), torch.randn(6, 4)
    results = []
    for op in (python, cpp):
        state = _state()
        # exact=False: no optimizer hook for this parameterless state
        state.set_rows({1: RowSelection(0, torch.tensor([0, 2]), torch.tensor([1, 3, 4]))}, exact=False)
        results.append(op(grad2d, x2d, state.mask, 1, True))
        state.set_rows({}, exact=True)
    _same(results[1], results[0])
    assert not results[1][0][1].any() and results[1][0][0].any()  # frozen row 1: zero dW
    # A mask that is not a control buffer's view (a copy carrying the state's id): Python decides.
    state = _state()
    state.set_dropped((1,))
    copy = state.mask.clone()
    copy._ldbfx_state_id = state.id
    _, cpp_masked = _pair("masked_grad")
    assert not cpp_masked(torch.ones(3), copy, 1).any() and state.skipped == {1}


def test_only_registered_control_buffers_are_written():
    # C++ knows a control buffer by its registered address, not by its shape: a tensor that only
    # looks like a state's mask (a slice of another 3n-byte bool tensor, a copy of the mask) goes
    # to the Python kernel, which records into the state the mask names; nothing is written past
    # the mask into someone else's bytes.
    import copy

    _, cpp = _pair("masked_grad")
    state = _state()
    state.set_dropped((1,))
    lookalike = torch.zeros(9, dtype=torch.bool)
    lookalike[1] = True
    for mask in (lookalike[:3], copy.deepcopy(state.mask)):
        mask._ldbfx_state_id = state.id
        assert not cpp(torch.ones(3), mask, 1).any()
        assert state.skipped == {1}  # recorded by the Python kernel, into the state
        state.skipped.clear()
    assert lookalike.tolist() == [False, True] + [False] * 7  # no record byte at 3 + 1


def test_a_dead_models_mask_is_refused_not_written():
    import gc

    from ldbfx.errors import LdbfxError

    state = LdbState(((),) * 3)
    mask = state.mask  # kept by someone after its model is gone
    del state
    gc.collect()
    _, cpp = _pair("masked_grad")
    with pytest.raises(LdbfxError, match="belongs to no live ldbfx model"):
        cpp(torch.ones(3), mask, 1)


def test_a_deep_copy_records_into_its_own_state():
    # copy.deepcopy(gm) (EMA, model soups) makes a state with a control buffer of its own: the
    # compiled copy's C++ kernels record there, not in the original's.
    import copy

    import ldbfx

    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(7)))
    gm = ldbfx.transform(model)
    twin = copy.deepcopy(gm)
    layer = [l for l in ldbfx.layers(twin) if l.eligible][0]
    ldbfx.set_dropped(twin, [layer])
    torch.compile(twin, backend="aot_eager", fullgraph=True)(torch.randn(3, 4)).sum().backward()
    assert twin.ldbfx_state._native_record.any()  # written by C++
    assert twin.ldbfx_state.skipped == {layer.index}
    assert gm.ldbfx_state.skipped == set() and not gm.ldbfx_state._native_record.any()


def test_a_state_cannot_be_pickled():
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(_state())


def test_states_made_before_the_build_are_registered_when_it_loads():
    code = ("from ldbfx.state import LdbState\n"
            "from ldbfx.ops import native, kernels\n"
            "state = LdbState(((),) * 3)\n"  # made before the kernels load
            "state.set_dropped((2,))\n"
            "assert native.available(), native.reason\n"
            "kernels.KERNELS['native']['masked_grad'](__import__('torch').ones(3), state.mask, 2)\n"
            "assert state._native_record.tolist() == [False, False, True]\n"  # C++ wrote it
            "assert state.skipped == {2}\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_a_stale_build_lock_of_an_older_torch_is_not_waited_on(monkeypatch, tmp_path):
    # PyTorch versions with FileBaton wait forever on the lock file a killed build leaves; where
    # one is older than any build, ldbfx warns and runs the Python kernels instead of hanging.
    import os
    import time

    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delattr(cpp_extension, "FileLock", raising=False)  # what such a torch lacks
    monkeypatch.setattr(native, "reason", native.reason)
    monkeypatch.setattr(native, "_available", None)
    lock = tmp_path / native._build_name() / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - 2 * native._STALE_S,) * 2)
    with pytest.warns(RuntimeWarning, match="was left by a build that did not finish.*Delete that file"):
        assert not native.available()
    assert str(lock) in native.reason
    monkeypatch.undo()
    assert native.available() and native.reason is None


def test_disabled_by_environment_gives_the_python_kernels_quietly():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from ldbfx.ops import native, path\n"
            "assert not native.available() and path.mechanism() == 'library', native.reason\n"
            "print(native.reason)")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "LDBFX_NATIVE": "0"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LDBFX_NATIVE=0"


def test_a_failed_build_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'ldbfx_native':\nnative.cpp:1:1: error: no compiler\n")

    monkeypatch.setattr(native, "reason", native.reason)  # restored by undo(), like the others
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.setattr(native, "_available", None)
    with pytest.warns(RuntimeWarning, match="could not be built .*error: no compiler.*Python kernels run instead"):
        assert not native.available()
    assert path.mechanism() == "library"
    with pytest.raises(RuntimeError, match="native compiled-path kernels are not available here"):
        path.using_mechanism("native")
    monkeypatch.undo()  # the real build's answer again
    assert native.available() and path.mechanism() == "native" and native.reason is None
