"""ldbfx.runtime.measure: the passes that count FLOPs or probe sensitivities leave the model as it was."""

import torch

import ldbfx
from ldbfx.runtime.measure import measuring


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return x + self.dropout(self.norm(self.fc(x)))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block() for _ in range(6)])


def _everything(gm):
    """What training reads from the model besides its parameters."""
    state = gm.ldbfx_state
    return (state.dropped, state.dropped_branches, dict(state.rows), state.branch_cut, set(state.skipped),
            gm.training, [b.clone() for b in gm.buffers()], torch.get_rng_state())


def _same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, list):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


def test_every_measurement_leaves_the_model_as_it_was():
    gm = ldbfx.transform(_model())
    x = torch.randn(4, 8)
    ldbfx.set_dropped(gm, [ldbfx.layers(gm)[5].name])
    ldbfx.set_frozen_rows(gm, {ldbfx.layers(gm)[6].name: [0, 1]})
    gm(x).sum().backward()  # a skip record for the next optimizer step
    gm.eval()
    before = _everything(gm)
    assert before[4], "the backward recorded a skipped layer"

    ldbfx.inspect.weight_grad_flops(gm, x)
    _same(before, _everything(gm))
    ldbfx.inspect.branch_flops(gm, x)
    _same(before, _everything(gm))
    policy = ldbfx.DropBP(gm, drop_rate=0.5, allocation="sensitivity")
    policy.start_epoch(0)
    before = _everything(gm)

    def closure():
        gm.train()
        return gm(x).square().mean()

    policy.allocate(closure)
    gm.eval()
    _same(before, _everything(gm))


def test_the_full_backward_is_counted_whatever_is_dropped():
    # "backward" is one full backward pass: layers dropped at the time of the call do not shrink it.
    gm = ldbfx.transform(_model())
    x = torch.randn(4, 8)
    full = ldbfx.inspect.weight_grad_flops(gm, x)
    ldbfx.set_dropped(gm, [l.name for l in ldbfx.layers(gm) if l.eligible])
    ldbfx.set_dropped_branches(gm, [b.name for b in ldbfx.branches(gm) if b.eligible])
    assert ldbfx.inspect.weight_grad_flops(gm, x) == full
    assert ldbfx.inspect.branch_flops(gm, x).backward == full.backward


def test_a_probe_reseeded_draws_the_same_dropout():
    gm = ldbfx.transform(_model())
    x = torch.randn(4, 8)
    with measuring(gm) as probe:
        probe.reseed()
        first = gm(x)
        probe.reseed()
        assert torch.equal(first, gm(x))
        probe.reseed(7)
        seven = gm(x)
        probe.reseed(7)
        assert torch.equal(seven, gm(x)) and not torch.equal(first, seven)
