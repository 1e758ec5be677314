"""Accuracy parity: baseline vs each policy over several seeds on the embedded digits data.

    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies ldb --out seeds.json
    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies cdb learn-and-drop --out seeds4.json
    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies ldb dropbp --out seeds-dropbp.json
    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies ldb dropbp --dropbp-rate matched --out F

``--dropbp-rate matched`` sets DropBP's uniform rate so that its expected backward FLOPs saved over
the run equal LayerDropBack's with the same options (see :func:`matched_dropbp_rate`).

Each seed trains the baseline and every policy with the demo's defaults (ResNet-18, 8 epochs,
batch 64; LDB drop_rate 0.3, period 2, kappa 2; CDB channel_rate 0.5, one layer per step;
Learn&Drop 2 warm-up epochs with the memory cache) and the same data order and initialisation.
Prints per-seed figures and, per policy, the mean and spread of the accuracy difference and of the
wall-clock time saved.
"""

import argparse
import json
import statistics
from dataclasses import replace

import torch

import ldbfx
from ldbfx.app.data import load as load_data
from ldbfx.policies.ldb import is_drop_epoch
from ldbfx.app.train import TrainConfig, build_model, train

POLICY_OPTIONS = {
    "ldb": {},
    "cdb": {"channel_rate": 0.5},
    "learn-and-drop": {"warmup_epochs": 2, "cache": "memory"},
    "dropbp": {"drop_rate": 0.5},  # every step, each eligible residual branch with p = 0.5
}


def _backward_flops(gm, x, y) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    loss = torch.nn.functional.cross_entropy(gm(x), y)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    gm.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matched_dropbp_rate(config: TrainConfig, probe: int = 16) -> dict:
    """DropBP's uniform rate whose expected backward FLOPs saved per sample, over the whole run,
    equal LayerDropBack's.

    LDB drops ``drop_rate`` of the eligible layers' weight gradients in DROP epochs only (the same
    samples per epoch whatever the batch), so it saves ``drop epochs / epochs x drop_rate x W``
    of the backward, W being every eligible layer's dW. DropBP drops each eligible branch with
    ``p`` at every step, saving ``p x B``, B being every eligible branch's whole backward (dX and
    dW; branches do not overlap in a ResNet). All three counts are ``FlopCounterMode``'s on one
    probe batch, in train mode, on the model the trainer builds.
    """
    torch.manual_seed(config.seed)
    splits = load_data(config.data, config.data_dir, image_size=config.image_size, seed=config.seed)
    gm = ldbfx.transform(build_model(config.model, splits.num_classes))
    x = torch.stack([splits.train[i][0] for i in range(probe)])
    y = torch.tensor([int(splits.train[i][1]) for i in range(probe)])
    full = _backward_flops(gm, x, y)
    ldbfx.set_dropped(gm, [l.index for l in ldbfx.layers(gm) if l.eligible])
    without_dw = _backward_flops(gm, x, y)
    ldbfx.set_dropped(gm, [])
    ldbfx.set_dropped_branches(gm, [b.index for b in ldbfx.branches(gm) if b.eligible])
    without_branches = _backward_flops(gm, x, y)
    drop_share = sum(is_drop_epoch(e, config.period) for e in range(config.epochs)) / config.epochs
    ldb_saved = drop_share * config.drop_rate * (full - without_dw) / full
    branch_share = (full - without_branches) / full
    if not 0 < ldb_saved < branch_share:
        raise SystemExit(f"no DropBP rate in (0, 1) matches LDB here: LDB saves {ldb_saved:.1%} of the backward, "
                         f"the eligible branches hold {branch_share:.1%}")
    return {"backward_flops": full, "eligible_dw_share": (full - without_dw) / full,
            "eligible_branch_share": branch_share, "drop_epoch_share": drop_share,
            "ldb_saved_share": ldb_saved, "dropbp_rate": ldb_saved / branch_share}


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--policies", nargs="+", choices=list(POLICY_OPTIONS), default=["ldb"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dropbp-rate", default="0.5",
                        help="DropBP's uniform rate, or 'matched': LDB's expected backward FLOPs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    matched = None
    if args.dropbp_rate == "matched":
        matched = matched_dropbp_rate(TrainConfig(model=args.model, epochs=args.epochs))
        print(json.dumps({"matched": matched}), flush=True)
        POLICY_OPTIONS["dropbp"] = {"drop_rate": round(matched["dropbp_rate"], 4)}
    else:
        POLICY_OPTIONS["dropbp"] = {"drop_rate": float(args.dropbp_rate)}
    rows = []
    for seed in args.seeds:
        config = TrainConfig(model=args.model, epochs=args.epochs, seed=seed, progress=False)
        base = train(replace(config, policy="none"))
        for policy in args.policies:
            run = train(replace(config, policy=policy, **POLICY_OPTIONS[policy]))
            row = {"seed": seed, "policy": policy, "acc_baseline": base.final_accuracy, "acc": run.final_accuracy,
                   "time_baseline": base.train_time, "time": run.train_time}
            if policy == "learn-and-drop":
                row["frozen_layers"] = run.history[-1]["frozen_layers"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for policy in args.policies:
        sel = [r for r in rows if r["policy"] == policy]
        diff = [r["acc"] - r["acc_baseline"] for r in sel]
        saved = [1 - r["time"] / r["time_baseline"] for r in sel]
        summary[policy] = {
            "accuracy_diff_mean": statistics.mean(diff),
            "accuracy_diff_stdev": statistics.stdev(diff) if len(diff) > 1 else 0.0,
            "acc_baseline_mean": statistics.mean(r["acc_baseline"] for r in sel),
            "acc_mean": statistics.mean(r["acc"] for r in sel),
            "time_saved_mean": statistics.mean(saved), "time_saved_min": min(saved), "time_saved_max": max(saved),
        }
    summary["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "matched": matched,
                       "dropbp_options": POLICY_OPTIONS["dropbp"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
