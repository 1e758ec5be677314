"""Accuracy parity: baseline vs each policy over several seeds on the embedded digits data.

    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies ldb --out seeds.json
    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies cdb learn-and-drop --out seeds4.json
    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --policies ldb dropbp --out seeds-dropbp.json

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

from ldbfx.train import TrainConfig, train

POLICY_OPTIONS = {
    "ldb": {},
    "cdb": {"channel_rate": 0.5},
    "learn-and-drop": {"warmup_epochs": 2, "cache": "memory"},
    "dropbp": {"drop_rate": 0.5},  # every step, each eligible residual branch with p = 0.5
}


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--policies", nargs="+", choices=list(POLICY_OPTIONS), default=["ldb"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
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
    summary["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
