"""DDP and FSDP2 with dropped layers: 2 gloo ranks on loopback, CPU, with a timeout guard."""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import ldbfx
from contract import assert_close_to_scale, saved_bytes

STEPS, BATCH, TIMEOUT_S = 4, 8, 120


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 16),
                         nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 6, 6, generator=g), torch.randint(0, 4, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _dropped_params(model, dropped):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in dropped}


def train(gm, model, net, batches, record, resample="step", after_first_step=lambda: None, unchanged=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    policy = ldbfx.LayerDropBack(gm, opt, drop_rate=0.5, period=1, kappa=1.0, resample=resample, seed=7)
    policy.start_epoch(1)  # a DROP epoch from the first step
    for step, (x, y) in enumerate(batches):
        record.append(policy.dropped)
        before = _dropped_params(model, policy.dropped) if unchanged is not None else {}
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        if unchanged is not None:  # this step's dropped layers, bit for bit (sharded: this rank's shard)
            after = _dropped_params(model, policy.dropped)
            unchanged.append(bool(before) and all(torch.equal(before[n], after[n]) for n in before))
        policy.step()
        if step == 0:
            after_first_step()
    policy.end_epoch()


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _wrap(gm, variant):
    """The distributed wrapper a variant names: ``ddp`` / ``fsdp``, then ``-plain`` (DDP as users
    write it: no ldbfx call), ``-optout`` (dense gradients explicitly off), ``-compile``, ``-hook``
    and ``-sparse`` (FSDP2 without dense gradients)."""
    result = {}
    if "-optout" in variant:
        ldbfx.distributed.dense_gradients(gm, enabled=False)
    elif not ("-sparse" in variant or "-plain" in variant):
        ldbfx.distributed.dense_gradients(gm)
    if variant.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard

        net = fully_shard(gm)
    elif variant.endswith("-hook"):
        # Tiny buckets: some hold only dropped layers (not sent), some are mixed (partly sent).
        net = nn.parallel.DistributedDataParallel(gm, bucket_cap_mb=0.001)  # no find_unused_parameters
        result["comm"] = ldbfx.distributed.skip_dropped_allreduce(net)
    else:
        net = nn.parallel.DistributedDataParallel(gm)  # no find_unused_parameters
    if "-compile" in variant:
        result["counter"] = counter = CompileCounterWithBackend("aot_eager")
        net = torch.compile(net, backend=counter)
    return net, result


def _rank(rank, world, init_file, out_dir, resample="step", variant="ddp"):
    _init(rank, world, init_file)
    model = make_model()
    gm = ldbfx.transform(model, keep_first=1)  # 4 of 6 layers eligible
    net, extra = _wrap(gm, variant)
    shard = BATCH // world
    batches = [(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]) for x, y in data()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks, compiled_frames, unchanged = [], [], []
    counter = extra.get("counter")
    train(gm, model, net, batches, masks, resample,
          after_first_step=lambda: compiled_frames.append(counter and counter.frame_count), unchanged=unchanged)
    ldbfx.distributed.check_masks(gm)
    params = {n: getattr(p, "full_tensor", p.detach)().detach() for n, p in model.named_parameters()}
    refusals = []
    if variant.startswith("fsdp"):  # row freezing and Learn&Drop refuse sharded parameters
        for attempt in (lambda: ldbfx.set_frozen_rows(gm, {"2": [0]}),
                        lambda: ldbfx.LearnAndDrop(gm, warmup_epochs=1).start_epoch(0)):
            try:
                attempt()
                refusals.append("")
            except ldbfx.LdbfxError as error:
                refusals.append(str(error))
    torch.save({"params": params, "before": before, "masks": masks, "comm": extra.get("comm"), "unchanged": unchanged,
                "dense": gm.ldbfx_state.dense,
                "frames": (compiled_frames[0], counter and counter.frame_count), "refusals": refusals},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(fn, world, *args):
    context = mp.spawn(fn, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed run did not finish in {TIMEOUT_S} s (hang)")


@pytest.mark.parametrize(("variant", "resample"), [
    ("ddp", "step"), ("ddp-plain", "epoch"), ("ddp-plain-compile", "step"), ("ddp-plain-hook", "step"),
    ("fsdp-sparse", "step"), ("fsdp-compile", "step"),
])
def test_distributed_with_dropped_layers_matches_one_process_on_the_whole_batch(tmp_path, variant, resample):
    _spawn(_rank, 2, str(tmp_path / "init"), str(tmp_path), resample, variant)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = make_model()
    gm = ldbfx.transform(model, keep_first=1)  # 4 of 6 layers eligible
    masks = []
    train(gm, model, gm, data(), masks, resample)
    assert not gm.ldbfx_state.dense  # one process: the default path
    # Eager DDP turns dense gradients on by itself; FSDP2 never does (it needs none). Compiled
    # DDP needs none either: the compiled path's dropped layers always yield zeros.
    if variant in ("ddp-plain", "ddp-plain-hook"):
        assert all(r["dense"] for r in ranks)
    if variant == "fsdp-sparse":
        assert not any(r["dense"] for r in ranks)
    if "-compile" in variant:  # masks changed every step: compiled once, on the first step
        assert all(r["frames"][0] >= 1 and r["frames"][0] == r["frames"][1] for r in ranks), ranks[0]["frames"]
    if variant.startswith("fsdp"):
        assert all(len(r["refusals"]) == 2 and all("FSDP2" in m for m in r["refusals"]) for r in ranks)
    if variant.endswith("-hook"):
        # Each step sends exactly the kept layers' gradients; the dropped ones' bytes are skipped.
        sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
        total = sum(sizes.values())
        skipped = sum(size for step in masks for n, size in sizes.items() if n.rsplit(".", 1)[0] in step)
        for r in ranks:
            assert r["comm"].steps == STEPS
            assert r["comm"].bytes_skipped == skipped > 0
            assert r["comm"].bytes_reduced == STEPS * total - skipped
    assert ranks[0]["masks"] == ranks[1]["masks"] == masks  # the same seed: the same layers everywhere
    assert all(masks), "layers were dropped at every step"
    assert ranks[0]["unchanged"] == ranks[1]["unchanged"] == [True] * STEPS  # the optimizer left them alone
    reference = dict(model.named_parameters())
    for r in ranks:
        for name, value in r["params"].items():
            # Two half batches vs one whole batch: other kernels, other summation orders.
            assert_close_to_scale(value, reference[name].detach(), 1e-5, what=name)
    # A layer dropped at every step stays bit-for-bit at its initial value on both ranks.
    always = set(masks[0]).intersection(*map(set, masks))
    assert always or resample == "step"
    for layer in always:
        for name in (n for n in ranks[0]["params"] if n.rsplit(".", 1)[0] == layer):
            for r in ranks:
                assert torch.equal(r["params"][name], r["before"][name]), name


def test_dense_gradients_explicitly_off_fails_under_ddp_as_pytorch_documents(tmp_path):
    # What the automatic dense mode removes: DDP sees the dropped layers as unused parameters.
    # An explicit enabled=False is the user's choice and is kept (e.g. with find_unused_parameters).
    with pytest.raises(Exception, match="finished reduction|unused parameters|did not receive grad"):
        _spawn(_rank, 2, str(tmp_path / "init"), str(tmp_path), "epoch", "ddp-optout")


def _divergent_rank(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    assert ldbfx.distributed.broadcast_seed(100 + rank) == 100  # rank-local seeds -> rank 0's
    gm = ldbfx.transform(make_model(), keep_first=1)
    ldbfx.distributed.check_masks(gm)  # all full: equal
    ldbfx.set_dropped(gm, [1 + rank])  # as if each rank had its own seed
    try:
        ldbfx.distributed.check_masks(gm)
        message = ""
    except ldbfx.LdbfxError as error:
        message = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_check_masks_detects_divergent_ranks(tmp_path):
    _spawn(_divergent_rank, 2, str(tmp_path / "init"), str(tmp_path))
    for rank in range(2):
        assert "masks differ between ranks" in (tmp_path / f"rank{rank}.txt").read_text()


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(4))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def _divergent_draws_rank(rank, world, init_file, out_dir):
    # DropBP draws branches and ChannelDropBack rows: a rank that drew other ones must be caught
    # too, each named. Every case starts from equal draws, then only rank 1 differs.
    _init(rank, world, init_file)
    torch.manual_seed(0)
    gm = ldbfx.transform(_Residual())
    branch = [b.name for b in ldbfx.branches(gm) if b.eligible][0]
    layer = [l.name for l in ldbfx.layers(gm) if l.eligible and l.kind == "linear"][0]
    messages = []
    for differ in (lambda: ldbfx.set_dropped_branches(gm, [branch]),
                   lambda: ldbfx.set_frozen_rows(gm, {layer: [rank]})):
        ldbfx.distributed.check_masks(gm)  # equal so far
        if rank == 1:
            differ()
        try:
            ldbfx.distributed.check_masks(gm)
            messages.append("")
        except ldbfx.LdbfxError as error:
            messages.append(str(error))
        ldbfx.set_dropped_branches(gm, [])
        ldbfx.set_frozen_rows(gm, {})
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(messages))
    dist.destroy_process_group()


def test_check_masks_detects_divergent_branches_and_rows(tmp_path):
    _spawn(_divergent_draws_rank, 2, str(tmp_path / "init"), str(tmp_path))
    for rank in range(2):
        branches, rows = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert "masks differ between ranks (rank 0 vs ranks [1]: dropped branches)" in branches
        assert "masks differ between ranks (rank 0 vs ranks [1]: frozen rows)" in rows


def test_skip_dropped_allreduce_names_what_is_missing():
    class FakeDDP:  # the hook is refused before DDP is touched
        def __init__(self, module):
            self.module = module

    with pytest.raises(ldbfx.LdbfxError, match="module from ldbfx.transform"):
        ldbfx.distributed.skip_dropped_allreduce(FakeDDP(make_model()))
    gm = ldbfx.transform(make_model())
    ldbfx.distributed.dense_gradients(gm, enabled=False)
    with pytest.raises(ldbfx.LdbfxError, match="dense_gradients"):
        ldbfx.distributed.skip_dropped_allreduce(FakeDDP(gm))


def test_dense_gradients_zero_for_dropped_layers_and_unchanged_for_kept_ones():
    x, y = data()[0]
    grads = {}
    for dense in (False, True):
        model = make_model()
        gm = ldbfx.transform(model, keep_first=1)
        ldbfx.distributed.dense_gradients(gm, enabled=dense)
        ldbfx.set_dropped(gm, ["2", "7"])
        nn.functional.cross_entropy(gm(x), y).backward()
        grads[dense] = {n: p.grad for n, p in model.named_parameters()}
        ldbfx.distributed.dense_gradients(gm, enabled=False)
    for name, grad in grads[True].items():
        if name.split(".")[0] in ("2", "7"):
            assert grads[False][name] is None and torch.count_nonzero(grad) == 0, name
        else:
            assert torch.equal(grad, grads[False][name]), name  # kept layers run the plain op


def test_dense_mode_keeps_no_more_activations_than_the_default_path():
    # Dense mode runs the default eager path (no dW, no input saved for it) and only adds zero
    # gradients: the tensors saved for backward are the same, byte for byte. In-place ops after a
    # dropped layer (ReLU(inplace=True)) work too.
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))],
                          nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(inplace=True), nn.Linear(16, 16),
                          nn.ReLU(inplace=True), nn.Linear(16, 4))
    x = torch.randn(4, 8, 6, 6)
    saved = {}
    for dense in (False, True):
        gm = ldbfx.transform(model, keep_first=1)
        ldbfx.distributed.dense_gradients(gm, enabled=dense)
        ldbfx.set_dropped(gm, ["2", "4", "9"])  # two convs and a linear
        losses = []
        saved[dense] = saved_bytes(lambda: losses.append(gm(x).square().sum()))
        losses[0].backward()
        assert (model[2].weight.grad is None) != dense and (model[9].bias.grad is None) != dense
        model.zero_grad(set_to_none=True)
    assert saved[True] == saved[False]
