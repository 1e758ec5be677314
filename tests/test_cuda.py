"""On a CUDA device: gradients over changing masks in every compiled mode, bf16, channels_last, a
policy's step. Skipped on machines without one (CI); run them where a GPU is lent:
``python -m pytest -q tests/test_cuda.py``.

GPU kernels may accumulate with atomics (cuDNN weight-gradient algorithms, split-K matmuls), so two
runs of even the same kernels can differ in the last bits: every comparison here uses the
tolerance on the tensor's scale (``contract.assert_close_to_scale``), never bitwise equality.
"""

import random

import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import ldbfx

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from contract import assert_close_to_scale  # noqa: E402


def _small_cnn():
    # Few distinct convolution shapes, so max-autotune's tuning stays short; 9 layers, 4 eligible.
    block = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
    return torch.nn.Sequential(*block(3, 16), *block(16, 16), *block(16, 16), *block(16, 16),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))


MODELS = {
    "cnn": (lambda: torchvision.models.resnet18(num_classes=10), (8, 3, 64, 64)),
    "small_cnn": (_small_cnn, (8, 3, 16, 16)),
    "transformer": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                              hidden_dim=64, mlp_dim=128, num_classes=10), (8, 3, 32, 32)),
}


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 would make fp32 matmuls and convolutions differ between compiled and eager far beyond
    # rounding; the comparisons are about which gradients are computed, not TF32's precision.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _setup(kind, channels_last=False):
    make, shape = MODELS[kind]
    torch.manual_seed(0)
    model = make().cuda()
    x = torch.randn(*shape, device="cuda")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return model, ldbfx.transform(model), x


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _masks(gm, count=4):
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    rng = random.Random(0)
    return [[l for l in eligible if rng.random() < 0.5] for _ in range(count)]


def _check(model, drop, got, want, rel):
    dropped = {p for l in drop for p in l.params}
    for name in dropped:
        assert name not in got or not got[name].any(), f"{name}: a dropped layer got a gradient"
    for name, g in want.items():
        assert_close_to_scale(got[name], g, rel, what=name)


def _follow_changing_masks(kind, mode):
    # reduce-overhead and max-autotune record CUDA graphs: a stale replay of the mask-dependent
    # ops would give the first mask's gradients for every later mask. Each mask is checked.
    model, gm, x = _setup(kind)
    torch._dynamo.utils.counters.clear()
    run = gm if mode == "eager" else torch.compile(gm, mode=mode, fullgraph=True)
    for drop in _masks(gm):
        ldbfx.set_dropped(gm, drop)
        model.zero_grad(set_to_none=True)
        if mode != "eager":
            torch.compiler.cudagraph_mark_step_begin()
        run(x).square().mean().backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        gm(x).square().mean().backward()  # eager reference with the same mask
        _check(model, drop, got, _grads(model), rel=2e-3)
    if mode in ("reduce-overhead", "max-autotune"):
        # Correct either way, but without CUDA graphs these modes would silently lose what they are
        # for: the mask-reading kernels must only split the graph (Inductor's graph partitions).
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        assert skips == 0, f"{mode}: CUDA graphs skipped {skips} time(s) (run with TORCH_LOGS=perf_hints)"


@pytest.mark.parametrize("mode", ["eager", "default", "reduce-overhead"])
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_gradients_follow_changing_masks(kind, mode):
    _follow_changing_masks(kind, mode)


@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_autocast_kept_gradients_match_freezing(kind):
    model, gm, x = _setup(kind)
    drop = _masks(gm, 1)[0]
    params = dict(model.named_parameters())
    frozen = {p for l in drop for p in l.params}
    for name in frozen:
        params[name].requires_grad_(False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    for name in frozen:
        params[name].requires_grad_(True)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    ldbfx.set_dropped(gm, drop)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gm(x).float().square().mean().backward()
    got = _grads(model)
    assert all(p.grad is None for n, p in params.items() if n in frozen)
    _check(model, drop, got, want, rel=1e-2)  # bf16: 8 mantissa bits


@pytest.mark.parametrize("compiled", [False, True])
def test_channels_last_cnn(compiled):
    model, gm, x = _setup("cnn", channels_last=True)
    run = torch.compile(gm, fullgraph=True) if compiled else gm
    for drop in _masks(gm, 2):
        ldbfx.set_dropped(gm, drop)
        model.zero_grad(set_to_none=True)
        run(x).square().mean().backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        gm(x).square().mean().backward()
        _check(model, drop, got, _grads(model), rel=2e-3)


def test_layer_dropback_step_leaves_dropped_layers_unchanged():
    model, gm, x = _setup("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    policy = ldbfx.LayerDropBack(gm, opt, drop_rate=0.5, period=1, kappa=1)
    params = dict(model.named_parameters())
    for epoch in range(2):
        policy.start_epoch(epoch)
        for _ in range(3):
            names = [p for l in ldbfx.layers(gm) if l.name in policy.dropped for p in l.params]
            before = {n: params[n].detach().clone() for n in names}
            opt.zero_grad()
            gm(x).square().mean().backward()
            opt.step()
            policy.step()
            for name, value in before.items():
                assert torch.equal(params[name], value), name
        policy.end_epoch()
    assert policy.stats["steps_drop"] == 3 and policy.stats["layers_dropped"] > 0


def _nccl_rank(rank, world, init_file, out_dir):
    import datetime
    import os

    import torch.distributed as dist
    from test_distributed import BATCH, data, make_model, train
    from torch import nn

    torch.cuda.set_device(rank)
    # Spawned: the parent's fixture does not reach here. TF32 would put these ranks ~1e-3 away
    # from the parent's fp32 reference.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    model = make_model().cuda()
    gm = ldbfx.transform(model, keep_first=1)
    net = nn.parallel.DistributedDataParallel(gm, device_ids=[rank])  # plain wrap: no ldbfx call
    shard = BATCH // world
    batches = [(x[rank * shard:(rank + 1) * shard].cuda(), y[rank * shard:(rank + 1) * shard].cuda())
               for x, y in data()]
    masks, unchanged = [], []
    train(gm, model, net, batches, masks, unchanged=unchanged)
    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    torch.save({"params": params, "masks": masks, "unchanged": unchanged, "dense": gm.ldbfx_state.dense},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
                    reason="needs a CUDA device and NCCL")
def test_nccl_ddp_on_every_gpu_matches_one_process(tmp_path):
    # As tests/test_distributed.py does with gloo on the CPU, on every GPU there is (one is enough:
    # DDP's reducer and NCCL still run). BATCH is split between the ranks, so each world size
    # reproduces the one-process run on the whole batch.
    from test_distributed import BATCH, _spawn, data, make_model, train

    world = max(d for d in range(1, torch.cuda.device_count() + 1) if BATCH % d == 0)
    _spawn(_nccl_rank, world, str(tmp_path / "init"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    model = make_model().cuda()
    gm = ldbfx.transform(model, keep_first=1)
    masks = []
    train(gm, model, gm, [(x.cuda(), y.cuda()) for x, y in data()], masks)
    assert all(r["masks"] == masks for r in ranks) and all(masks)
    assert all(r["dense"] for r in ranks), "eager DDP turns dense gradients on by itself"
    assert all(all(r["unchanged"]) for r in ranks), "a dropped layer moved under DDP"
    for name, p in model.named_parameters():
        for r in ranks:  # all-reduced gradients: rounding differs from one process, within tolerance
            assert_close_to_scale(r["params"][name], p.detach().cpu(), 1e-4, what=name)


def test_row_selections_take_cuda_indices():
    # A policy may compute the frozen rows on the GPU; the table itself lives beside the CPU mask.
    model, gm, x = _setup("cnn")
    layer = next(l for l in ldbfx.layers(gm) if l.eligible and l.kind == "conv")
    out_channels = dict(model.named_parameters())[layer.params[0]].shape[0]
    frozen = torch.arange(0, out_channels, 2, device="cuda")
    ldbfx.set_frozen_rows(gm, {layer.name: frozen})
    assert ldbfx.frozen_rows(gm) == {layer.name: frozen.tolist()}
    as_bool = torch.zeros(out_channels, dtype=torch.bool, device="cuda")
    as_bool[frozen] = True
    ldbfx.set_frozen_rows(gm, {layer.name: as_bool})
    assert ldbfx.frozen_rows(gm) == {layer.name: frozen.tolist()}
    gm(x).square().mean().backward()
    weight = dict(model.named_parameters())[layer.params[0]]
    assert not weight.grad[frozen].any() and weight.grad[1::2].any()


# Last, so that a run cut short by benchmarks/gpu.sh's time limit loses only these: max-autotune
# tunes every distinct convolution and matmul (minutes on ResNet-18), so a small CNN and the small
# ViT cover it (the convolution and linear kernels under autotuning and CUDA graphs).
@pytest.mark.parametrize("kind", ["small_cnn", "transformer"])
def test_max_autotune_gradients_follow_changing_masks(kind):
    _follow_changing_masks(kind, "max-autotune")
