"""Per-step all-reduce bytes and step time of LayerDropBack under DDP, with and without skipping
the dropped layers' gradients (``ldbfx.distributed.skip_dropped_allreduce``).

    python benchmarks/ddp_comm.py --models resnet50 vit_b_16 --resolution 64 --batch 4 \
        --drop-rates 0.3 0.5 --out benchmarks/results/ddp-comm.json

Spawns ``--ranks`` processes on this machine (gloo on CPU, NCCL with ``--device cuda``, one GPU per
rank). Every rank trains the same LDB DROP-epoch steps (a fresh draw each step, the policies' shared
seed) on synthetic data, in dense-gradient mode, once with DDP's own all-reduce and once with the
hook. Bytes are counted, not estimated: plain DDP all-reduces every bucket whole (the sum of the
gradient bytes), the hook counts what it sends and what it leaves out. Step times are the median
over rotated rounds of ``--steps`` consecutive steps (one rank's clock; the ranks wait for each other).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ldbfx
from ldbfx.app.bench import make_model, run_meta
from ldbfx.app.train import _sync


def _setup(name, args, drop_rate, device, hook):
    torch.manual_seed(0)
    model = make_model(name, args.resolution).to(device)
    gm = ldbfx.transform(model)
    ldbfx.distributed.dense_gradients(gm)
    ddp = torch.nn.parallel.DistributedDataParallel(gm, device_ids=[device] if device.type == "cuda" else None)
    stats = ldbfx.distributed.skip_dropped_allreduce(ddp) if hook else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    policy = ldbfx.LayerDropBack(gm, opt, drop_rate=drop_rate, period=1, kappa=1.0, seed=0)
    policy.start_epoch(1)  # a DROP epoch
    return model, ddp, opt, policy, stats


def _step(ddp, opt, policy, x, y):
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    policy.step()


def _rank(rank, world, init_file, args, out_path):
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = []
    for name in args.models:
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        for drop_rate in args.drop_rates:
            runs = {hook: _setup(name, args, drop_rate, device, hook) for hook in (False, True)}
            for model, ddp, opt, policy, _ in runs.values():
                for _ in range(args.warmup):
                    _step(ddp, opt, policy, x, y)
            times = {False: [], True: []}
            for r in range(args.rounds):
                for hook in ((False, True) if r % 2 == 0 else (True, False)):  # rotated rounds
                    model, ddp, opt, policy, stats = runs[hook]
                    if stats is not None:
                        sent = (stats.bytes_reduced, stats.bytes_skipped, stats.steps)
                    _sync(str(device))
                    dist.barrier()
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        _step(ddp, opt, policy, x, y)
                    _sync(str(device))
                    times[hook].append((time.perf_counter() - started) / args.steps)
            model, _, _, policy, stats = runs[True]
            gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            steps = stats.steps - sent[2]
            rows.append({
                "model": name, "drop_rate": drop_rate, "ranks": world,
                "bytes_per_step_ddp": gradient_bytes,
                "bytes_per_step_hook": (stats.bytes_reduced - sent[0]) / steps,
                "bytes_skipped_per_step": (stats.bytes_skipped - sent[1]) / steps,
                "actual_drop_rate": policy.stats["actual_drop_rate"],
                "step_time_ddp": statistics.median(times[False]),
                "step_time_hook": statistics.median(times[True]),
                "step_time_ddp_range": [min(times[False]), max(times[False])],
                "step_time_hook_range": [min(times[True]), max(times[True])],
            })
            for _, _, _, policy, _ in runs.values():
                policy.remove()
            del runs
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"meta": {**run_meta(str(device)), "args": vars(args)}, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="per-rank batch")
    parser.add_argument("--drop-rates", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.ranks, os.path.join(tmp, "init"), args, os.path.abspath(args.out)),
                 nprocs=args.ranks)
    with open(args.out) as f:
        for r in json.load(f)["rows"]:
            print(f"{r['model']:>10} drop {r['drop_rate']:.1f}: {r['bytes_per_step_ddp'] / 1e6:.1f} MB/step -> "
                  f"{r['bytes_per_step_hook'] / 1e6:.1f} MB/step with the hook; s/step "
                  f"{r['step_time_ddp']:.3f} -> {r['step_time_hook']:.3f}")


if __name__ == "__main__":
    main()
