"""Drop-rate sweep like the LDB paper's Figure 3: accuracy and speed-up vs ``drop_rate``.

    python benchmarks/drop_rate_sweep.py --rates 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 --seeds 0 1 \
        --out benchmarks/results/sweep.json --plot docs/drop_rate_sweep.png

On the embedded digits data with the demo's set-up (ResNet-18, 8 epochs, batch 64, period 2,
kappa 2). Per seed: one baseline run, then one LDB run per drop rate (same seed, data order and
initialisation). Per rate it records final accuracy, wall-clock time saved by the whole run, the
share of backward FLOPs skipped in DROP epochs, and a controlled speed-up estimate (per-sample
step times measured in rotated blocks by :func:`ldbfx.app.demo.decompose_speedup`, combined with the
epoch schedule) that is less noisy than one run's wall clock on a shared CPU.

``--speed-only`` skips training and measures only the controlled estimate per rate (about 15 s
each), for a quiet machine. ``--replot ROWS.jsonl [--speed SPEED.json]`` draws the figure from
saved per-run rows (one JSON object per line, as printed), taking the speed-up from a
``--speed-only`` run when given:

    python benchmarks/drop_rate_sweep.py --speed-only --out benchmarks/results/sweep-speed.json
    python benchmarks/drop_rate_sweep.py --replot rows.jsonl --speed sweep-speed.json --plot docs/drop_rate_sweep.png
"""

import argparse
import json
import statistics
from dataclasses import replace

import torch

from ldbfx.app.demo import decompose_speedup
from ldbfx.app.train import TrainConfig, train


def _controlled_speedup(config: TrainConfig, n_drop: int, n_full: int) -> float:
    parts = decompose_speedup(config, steps=3, rounds=3)
    total = (n_drop + n_full) * parts["full_B"]
    return total / (n_full * parts["full_B"] + n_drop * parts["drop_kB"]) - 1


def main():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=None, help="JSON with every row and the per-rate summary")
    parser.add_argument("--plot", default=None, help="PNG: accuracy and speed-up vs drop rate")
    parser.add_argument("--speed-only", action="store_true", help="only the controlled speed-up per rate")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the per-run controlled estimate (take it from a --speed-only run)")
    parser.add_argument("--replot", default=None, help="JSON-lines file of per-run rows to plot (no training)")
    parser.add_argument("--speed", default=None, help="with --replot: a --speed-only JSON for the speed-up")
    args = parser.parse_args()
    if args.speed_only:
        _speed_only(args)
        return
    if args.replot:
        with open(args.replot) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        summary = _summarize(rows, sorted({r["drop_rate"] for r in rows}))
        if args.speed:
            with open(args.speed) as f:
                speed = {r["drop_rate"]: r["speedup_controlled"] for r in json.load(f)["rows"]}
            for s in summary:
                s["speedup_controlled_mean"] = speed[s["drop_rate"]]
                s["time_saved_wall_mean"] = None  # runs shared the CPU: their wall clock is not shown
        for s in summary:
            print(json.dumps(s))
        _plot(summary, args.plot, len({r["seed"] for r in rows}))
        return
    rows = []
    for seed in args.seeds:
        config = TrainConfig(model=args.model, epochs=args.epochs, seed=seed, progress=False)
        base = train(replace(config, policy="none"))
        print(json.dumps({"seed": seed, "baseline_acc": base.final_accuracy, "baseline_time": base.train_time}),
              flush=True)
        for rate in args.rates:
            ldb_config = replace(config, policy="ldb", drop_rate=rate)
            ldb = train(ldb_config)
            drop_rows = [r for r in ldb.history if r["mode"] == "drop"]
            n_drop, n_full = len(drop_rows), len(ldb.history) - len(drop_rows)
            row = {
                "seed": seed, "drop_rate": rate,
                "acc_baseline": base.final_accuracy, "acc_ldb": ldb.final_accuracy,
                "time_saved_wall": 1 - ldb.train_time / base.train_time,
                "speedup_controlled": None if args.no_speed else _controlled_speedup(ldb_config, n_drop, n_full),
                "bwd_flops_skipped_drop_epochs": statistics.mean(r["bwd_flops_skipped"] for r in drop_rows),
                "actual_drop_rate": drop_rows[-1].get("actual_drop_rate"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = _summarize(rows, args.rates)
    for s in summary:
        print(json.dumps(s))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "meta": meta, "rows": rows, "summary": summary}, f, indent=1)
    if args.plot:
        _plot(summary, args.plot, len(args.seeds))


def _summarize(rows, rates):
    summary = []
    for rate in rates:
        sel = [r for r in rows if r["drop_rate"] == rate]
        diff = [r["acc_ldb"] - r["acc_baseline"] for r in sel]
        summary.append({
            "drop_rate": rate,
            "acc_diff_mean": statistics.mean(diff), "acc_diff_min": min(diff), "acc_diff_max": max(diff),
            "acc_ldb_mean": statistics.mean(r["acc_ldb"] for r in sel),
            "time_saved_wall_mean": statistics.mean(r["time_saved_wall"] for r in sel),
            "speedup_controlled_mean": (None if any(r["speedup_controlled"] is None for r in sel)
                                        else statistics.mean(r["speedup_controlled"] for r in sel)),
            "bwd_flops_skipped_mean": statistics.mean(r["bwd_flops_skipped_drop_epochs"] for r in sel),
        })
    return summary


def _speed_only(args):
    from ldbfx.policies import is_drop_epoch

    config = TrainConfig(model=args.model, epochs=args.epochs, progress=False, policy="ldb")
    n_drop = sum(is_drop_epoch(e, config.period) for e in range(args.epochs))
    rows = []
    for rate in args.rates:
        speedup = _controlled_speedup(replace(config, drop_rate=rate), n_drop, args.epochs - n_drop)
        rows.append({"drop_rate": rate, "speedup_controlled": speedup})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "meta": meta, "rows": rows}, f, indent=1)


def _plot(summary, path, n_seeds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [s["drop_rate"] for s in summary]
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(10, 3.6))
    diff = [100 * s["acc_diff_mean"] for s in summary]
    err = [[100 * (s["acc_diff_mean"] - s["acc_diff_min"]) for s in summary],
           [100 * (s["acc_diff_max"] - s["acc_diff_mean"]) for s in summary]]
    ax_acc.errorbar(rates, diff, yerr=err, marker="o", capsize=3)
    ax_acc.axhline(0, color="grey", lw=0.8)
    ax_acc.set_title(f"LDB − baseline test accuracy (points; {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    ax_speed.plot(rates, [100 * s["speedup_controlled_mean"] for s in summary], marker="o",
                  label="whole-run speed-up, controlled estimate")
    if all(s["time_saved_wall_mean"] is not None for s in summary):
        ax_speed.plot(rates, [100 * s["time_saved_wall_mean"] for s in summary], marker="s", ls="--",
                      label="wall time saved, whole run (noisy)")
    ax_speed.plot(rates, [100 * s["bwd_flops_skipped_mean"] for s in summary], marker="^", ls=":",
                  label="bwd FLOPs skipped in DROP epochs")
    ax_speed.set_title("speed (%)")
    ax_speed.legend(fontsize=8)
    for ax in (ax_acc, ax_speed):
        ax.set_xlabel("drop_rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
