"""Where LayerDropBack's speed-up comes from: kappa = 1 vs kappa = 2, eager and compiled.

    python benchmarks/ldb_speedup.py --models resnet50 vit_b_16 --resolution 128 --batch 8 \
        --out benchmarks/results/ldb_speedup.json

Synthetic inputs, the model's real shapes. Per mode (eager, compiled) five variants run in blocks of
consecutive steps, the block order rotated per round (CPU timings of single interleaved steps were
not reproducible):

* ``base_B`` / ``base_kB``: the untransformed model, full backprop, batch B and kappa*B;
* ``ldb_full_B``: the transformed model, nothing dropped (the pass's overhead);
* ``ldb_drop_B`` / ``ldb_drop_kB``: a fresh random mask every step at ``--drop-rate``
  (kappa = 1: the drop alone; kappa = 2: the paper's set-up).

Reported per model and mode: seconds per sample of each variant; the DROP-step time per sample
relative to a full step for kappa = 1 and 2; the whole-run speed-up of the period-2 schedule (half
the epochs DROP) implied by those; and the FLOP bound for the same schedule (skipping the dropped
layers' weight gradients, from ``FlopCounterMode``; FLOPs per sample do not depend on the batch, so
the bound is the same for both kappas). Paper (Tables 1-2): 16.9% fine-tuning, 23.3% from scratch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ldbfx
from ldbfx.app.bench import make_model, run_meta
from ldbfx.policies import draw_dropped
from ldbfx.app.train import _sync


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(name: str, args) -> dict:
    device = args.device
    torch.manual_seed(0)
    model = make_model(name, args.resolution).to(device)
    gm = ldbfx.transform(model)
    eligible = tuple(l.index for l in ldbfx.layers(gm) if l.eligible)
    big = round(args.kappa * args.batch)
    x_all = torch.randn(big, 3, args.resolution, args.resolution, device=device)
    y_all = torch.randint(0, 1000, (big,), device=device)
    generator = torch.Generator().manual_seed(0)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]

    # FLOP bound: expected dW FLOPs skipped per sample at drop_rate, over forward + backward.
    report = ldbfx.inspect.weight_grad_flops(gm, x_all[: args.batch])
    x, y = x_all[: args.batch], y_all[: args.batch]
    fwd = _flops(lambda: F.cross_entropy(model(x), y))
    loss = F.cross_entropy(model(x), y)
    bwd = _flops(loss.backward)
    model.zero_grad(set_to_none=True)
    expected_skip = args.drop_rate * sum(report.weight_grad[i] for i in eligible)
    drop_step_flops = 1 - expected_skip / (fwd + bwd)
    out = {"model": name, "fwd_flops": fwd, "bwd_flops": bwd, "eligible_layers": len(eligible),
           "drop_step_flops_ratio": drop_step_flops,
           "flop_bound_speedup": 2 / (1 + drop_step_flops) - 1}

    def step(net, batch, drop):
        set_dropped_now = draw_dropped(generator, eligible, args.drop_rate) if drop else ()
        ldbfx.set_dropped(gm, set_dropped_now)
        xb, yb = x_all[:batch], y_all[:batch]
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
            logits = net(xb)
        F.cross_entropy(logits.float(), yb).backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed / batch

    modes = {"eager": (model, gm)}
    if args.compile:
        torch._dynamo.reset()
        modes["compiled"] = (torch.compile(model), torch.compile(gm))
    for mode, (base_net, ldb_net) in modes.items():
        variants = {"base_B": (base_net, args.batch, False), "base_kB": (base_net, big, False),
                    "ldb_full_B": (ldb_net, args.batch, False), "ldb_drop_B": (ldb_net, args.batch, True),
                    "ldb_drop_kB": (ldb_net, big, True)}
        names = list(variants)
        times = {n: [] for n in names}
        for n in names:  # compile every shape once before timing
            step(*variants[n])
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                step(*variants[n])  # warm-up of the block
                times[n].append(statistics.median(step(*variants[n]) for _ in range(args.steps)))
        per_sample = {n: statistics.median(t) for n, t in times.items()}
        full = per_sample["base_B"]
        res = {"seconds_per_sample": per_sample,
               "overhead_nothing_dropped": per_sample["ldb_full_B"] / full - 1,
               "batch_only_step_ratio": per_sample["base_kB"] / full}
        for kappa, key in ((1, "ldb_drop_B"), (args.kappa, "ldb_drop_kB")):
            ratio = per_sample[key] / full
            res[f"kappa{kappa:g}_drop_step_ratio"] = ratio
            res[f"kappa{kappa:g}_run_speedup"] = 2 / (1 + ratio) - 1
        # Paired per round, to show the spread of the headline figure.
        paired = [2 / (1 + d / b) - 1 for d, b in zip(times["ldb_drop_kB"], times["base_B"])]
        res[f"kappa{args.kappa:g}_run_speedup_range"] = [min(paired), max(paired)]
        out[mode] = res
    ldbfx.set_dropped(gm, ())
    print(json.dumps(out), flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kappa", type=float, default=2.0)
    parser.add_argument("--drop-rate", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(bench(name, args))
        if args.out:  # after every model, so a run cut short (benchmarks/gpu.sh's limits) keeps it
            with open(args.out, "w") as f:
                json.dump({"meta": run_meta(args.device), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
