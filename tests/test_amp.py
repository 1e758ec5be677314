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
    with ops.opaque_path() if path == "opaque" else torch.enable_grad():
        got = grads(gm, drop)
    dropped = {p for l in drop for p in l.params}
    for n, g in got.items():
        if n in dropped:
            assert g is None or not g.any()
        else:
            assert g is not None and g.dtype == want[n].dtype
            _bf16_close(g, want[n])
