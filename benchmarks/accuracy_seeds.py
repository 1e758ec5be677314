"""Accuracy parity: baseline vs LayerDropBack over several seeds on the embedded digits data.

    python benchmarks/accuracy_seeds.py --seeds 0 1 2 3 4 --out seeds.json

Each seed trains both runs with the demo's defaults (ResNet-18, 8 epochs, batch 64, drop_rate 0.3,
period 2, kappa 2) and the same data order and initialisation. Prints per-seed figures and the
mean and spread of the accuracy difference and of the wall-clock time saved.
"""

import argparse
import json
import statistics
from dataclasses import replace

import torch

from ldbfx.train import TrainConfig, train


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        config = TrainConfig(model=args.model, epochs=args.epochs, seed=seed, progress=False)
        base = train(replace(config, policy="none"))
        ldb = train(replace(config, policy="ldb"))
        row = {"seed": seed, "acc_baseline": base.final_accuracy, "acc_ldb": ldb.final_accuracy,
               "time_baseline": base.train_time, "time_ldb": ldb.train_time}
        rows.append(row)
        print(json.dumps(row), flush=True)
    diff = [r["acc_ldb"] - r["acc_baseline"] for r in rows]
    saved = [1 - r["time_ldb"] / r["time_baseline"] for r in rows]
    summary = {
        "accuracy_diff_mean": statistics.mean(diff), "accuracy_diff_stdev": statistics.stdev(diff) if len(diff) > 1 else 0.0,
        "acc_baseline_mean": statistics.mean(r["acc_baseline"] for r in rows),
        "acc_ldb_mean": statistics.mean(r["acc_ldb"] for r in rows),
        "time_saved_mean": statistics.mean(saved), "time_saved_min": min(saved), "time_saved_max": max(saved),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
