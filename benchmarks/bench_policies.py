"""FLOPs and step time of ChannelDropBack and Learn&Drop vs the baseline and LayerDropBack.

    python benchmarks/bench_policies.py --models resnet50 vit_b_16 --resolution 128 --batch 8 \
        --out benchmarks/results/policies.json

Synthetic inputs, the model's real shapes, eager mode, one step = forward + backward. Variants:

* ``baseline``: the untransformed model;
* ``ldb_0.3``: LayerDropBack masks (drop_rate 0.3), a fresh draw every step;
* ``cdb_one``: ChannelDropBack as in the paper, one layer per step, channel_rate 0.5;
* ``cdb_all``: every candidate layer selected (``selection="independent", layer_rate=1``),
  channel_rate 0.5: the largest saving CDB's rule allows;
* ``lnd_25`` / ``lnd_50``: Learn&Drop with the first 25% / 50% of scored layers frozen
  (backward truncated at the cut), without cache;
* ``lnd_50_cache``: the same prefix with the feature cache hit (head forward + backward only).

Per variant: forward and backward FLOPs (``FlopCounterMode``) and the median step time over
rotated rounds of consecutive steps.
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


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(name: str, args) -> list[dict]:
    device = args.device
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    indices = torch.arange(args.batch)
    generator = torch.Generator().manual_seed(0)

    def fresh():
        torch.manual_seed(0)
        model = make_model(name, args.resolution).to(device)
        return model, ldbfx.transform(model)

    def setup_baseline():
        model, _ = fresh()
        return model, lambda: model(x), lambda: None

    def setup_ldb():
        model, gm = fresh()
        eligible = tuple(l.index for l in ldbfx.layers(gm) if l.eligible)
        return model, lambda: gm(x), lambda: ldbfx.set_dropped(gm, draw_dropped(generator, eligible, 0.3))

    def setup_cdb(selection):
        def setup():
            model, gm = fresh()
            policy = ldbfx.ChannelDropBack(gm, None, channel_rate=0.5, selection=selection, seed=0)
            policy.start_epoch(0)
            return model, lambda: gm(x), policy.step
        return setup

    def setup_lnd(fraction, cache):
        def setup():
            model, gm = fresh()
            policy = ldbfx.LearnAndDrop(gm, None, warmup_epochs=0, cache="memory" if cache else None,
                                        num_samples=args.batch)
            policy.freeze_units(max(1, round(fraction * len(policy._scored))))
            if cache:
                policy.forward(x, indices)  # fills the cache: the timed steps hit it
                return model, lambda: policy.forward(x, indices), lambda: None
            return model, lambda: gm(x), lambda: None
        return setup

    setups = {"baseline": setup_baseline, "ldb_0.3": setup_ldb, "cdb_one": setup_cdb("one"),
              "cdb_all": setup_cdb("independent"), "lnd_25": setup_lnd(0.25, False),
              "lnd_50": setup_lnd(0.5, False), "lnd_50_cache": setup_lnd(0.5, True)}
    variants = {}
    rows = {}
    for key, setup in setups.items():
        model, forward, advance = setup()
        advance()

        def step(model=model, forward=forward, advance=advance):
            _sync(device)
            start = time.perf_counter()
            F.cross_entropy(forward(), y).backward()
            _sync(device)
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            advance()
            return elapsed

        fwd = _count(forward)
        loss = F.cross_entropy(forward(), y)
        bwd = _count(loss.backward)
        model.zero_grad(set_to_none=True)
        rows[key] = {"model": name, "variant": key, "fwd_flops": fwd, "bwd_flops": bwd, "times": []}
        variants[key] = step
    names = list(variants)
    for r in range(args.rounds):
        for key in names[r % len(names):] + names[: r % len(names)]:
            variants[key]()  # warm-up of the block
            rows[key]["times"].append(statistics.median(variants[key]() for _ in range(args.steps)))
    base = rows["baseline"]
    out = []
    for key, row in rows.items():
        row["step_time"] = statistics.median(row["times"])
        paired = [1 - t / b for t, b in zip(row["times"], base["times"])]
        row["time_saved"] = statistics.median(paired)
        row["time_saved_range"] = [min(paired), max(paired)]
        row["bwd_flops_saved"] = 1 - row["bwd_flops"] / base["bwd_flops"]
        row["step_flops_saved"] = 1 - (row["fwd_flops"] + row["bwd_flops"]) / (base["fwd_flops"] + base["bwd_flops"])
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
        out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [row for name in args.models for row in bench(name, args)]
    if args.out:
        meta = run_meta(args.device)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
