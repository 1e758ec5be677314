"""Eager step time of dense-gradient mode (``ldbfx.distributed.dense_gradients``, what DDP needs)
vs ldbfx's default eager path, with the same LayerDropBack draws. One process, no communication.

    python benchmarks/dense_mode.py --models resnet50 vit_b_16 --resolution 64 --batch 8 \
        --out benchmarks/results/dense-mode.json

Dense mode runs the default eager path and attaches zero gradients (not computed) to the dropped
layers' parameters, which the optimizer hook turns back into ``None``; kept layers run the plain op.
(Until 2026-12-01 dense mode ran the compiled path's Functions eagerly for dropped layers.)
Median over rotated rounds of ``--steps`` consecutive steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import ldbfx
from ldbfx.app.bench import make_model, run_meta
from ldbfx.app.train import _sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--drop-rate", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=args.device)
        y = torch.randint(0, 1000, (args.batch,), device=args.device)
        runs = {}
        for dense in (False, True):
            torch.manual_seed(0)
            model = make_model(name, args.resolution).to(args.device)
            gm = ldbfx.transform(model)
            ldbfx.distributed.dense_gradients(gm, enabled=dense)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            policy = ldbfx.LayerDropBack(gm, opt, drop_rate=args.drop_rate, period=1, kappa=1.0, seed=0)
            policy.start_epoch(1)
            runs[dense] = (gm, opt, policy)

        def step(gm, opt, policy, x=x, y=y):
            F.cross_entropy(gm(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            policy.step()

        for run in runs.values():
            step(*run)
        times = {False: [], True: []}
        for r in range(args.rounds):
            for dense in ((False, True) if r % 2 == 0 else (True, False)):
                _sync(args.device)
                started = time.perf_counter()
                for _ in range(args.steps):
                    step(*runs[dense])
                _sync(args.device)
                times[dense].append((time.perf_counter() - started) / args.steps)
        default, dense = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"model": name, "drop_rate": args.drop_rate, "step_time_default": default,
                     "step_time_dense": dense, "default_range": [min(times[False]), max(times[False])],
                     "dense_range": [min(times[True]), max(times[True])]})
        print(f"{name}: eager {default:.3f} s/step, dense mode {dense:.3f} s/step ({100 * (dense / default - 1):+.1f}%)")
        for _, _, policy in runs.values():
            policy.remove()
    with open(args.out, "w") as f:
        json.dump({"meta": {**run_meta(args.device), "args": vars(args)}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
