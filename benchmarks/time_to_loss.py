"""Does training reach the same loss sooner? Time to loss on real text and real images.

One command per setting; each races its variants round-robin in one process on the same batches
(``ldbfx.app.race``), for the same budget of training wall time each:

    python benchmarks/time_to_loss.py lm-scratch      # byte-level Llama on the stdlib, from scratch
    python benchmarks/time_to_loss.py lm-finetune     # ... fine-tuned from lm-scratch's checkpoint on test/
    python benchmarks/time_to_loss.py lm-lora         # ... the same, LoRA r=8 on every projection
    python benchmarks/time_to_loss.py digits-scratch  # the demo's ResNet-18 on digits
    python benchmarks/time_to_loss.py digits-finetune # pretrained on digits 0-4, fine-tuned on 5-9

Protocol (defaults; every one is an option):

1. **Sweep, seed 0.** The baseline and one configuration of each method family (LayerDropBack
   0.3 at kappa 2 and 1, DropBP 0.5 uniform and sensitivity-allocated) at each of ``--lrs``;
   the other configurations at the baseline's best rate. The baseline's best rate must lie
   inside the range (the result says so when it does not).
2. **Seeds 1, 2.** Every configuration at the baseline's best rate, and each family at its own
   best rate where that differs.
3. **Report.** Per configuration, over seeds: final validation figure, the training time it
   needed to reach the baseline's final figure (of the same seed) or "not reached", FLOPs and
   activation bytes per sample relative to the baseline, steps. JSON, a PNG (validation against
   time, steps and FLOPs) and a markdown table under ``--out``.

The schedule is AdamW with linear warmup (5% of the budget) then cosine to a tenth, as a function
of the variant's own training time. ``--compile`` races ``torch.compile``d models (compile time is
measured before the race and reported apart). Peak memory on CPU: there is no allocator counter,
so the figure is the bytes of the tensors autograd saves for backward in one step (the
activation memory a drop method can change), measured with ``saved_tensors_hooks``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from ldbfx.app.bench import run_meta
from ldbfx.app.race import Curve, Variant, race, time_to_reach
from ldbfx.app.workloads import LmSize, digits_task, lm_task, lora

SETTINGS = ("lm-scratch", "lm-finetune", "lm-lora", "digits-scratch", "digits-finetune")
DEFAULTS = {  # budget (s), learning rates swept (short budgets favour high rates: the first
    # sweep of lm-lora at 1e-3, 2e-3, 4e-3 chose 4e-3, at its edge; these ranges centre on it)
    "lm-scratch": (30, (2e-3, 4e-3, 8e-3)),
    "lm-finetune": (20, (5e-4, 1e-3, 2e-3)),
    "lm-lora": (20, (2e-3, 4e-3, 8e-3)),
    "digits-scratch": (20, (1e-3, 2e-3, 4e-3)),
    "digits-finetune": (10, (5e-4, 1e-3, 2e-3)),
}


def families(lr: float, only: list[str] | None = None) -> dict[str, list[Variant]]:
    """Each family's configurations; the first of each is the one swept over learning rates."""
    every = {
        "baseline": [Variant("baseline", lr), Variant("baseline", lr, kappa=2.0)],
        "ldb-k2": [Variant("ldb", lr, drop_rate=0.3, kappa=2.0), Variant("ldb", lr, drop_rate=0.5, kappa=2.0)],
        "ldb-k1": [Variant("ldb", lr, drop_rate=0.3, kappa=1.0), Variant("ldb", lr, drop_rate=0.5, kappa=1.0)],
        "dropbp-uniform": [Variant("dropbp", lr, drop_rate=0.5), Variant("dropbp", lr, drop_rate=0.25)],
        "dropbp-sensitivity": [Variant("dropbp", lr, drop_rate=0.5, allocation="sensitivity"),
                               Variant("dropbp", lr, drop_rate=0.25, allocation="sensitivity")],
    }
    return {name: configs for name, configs in every.items() if only is None or name in only}


def _pretrained(kind: str, size: str, steps: int, cache: str, lr: float, device: str) -> dict:
    """The checkpoint fine-tuning starts from: the baseline trained ``steps`` steps (cached)."""
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{kind}-{size}-{steps}.pt")
    if os.path.exists(path):
        return torch.load(path, map_location=device)
    task = lm_task(size, device=device) if kind == "lm" else digits_task(range(5), device=device)
    torch.manual_seed(0)
    model = task.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / (steps // 20 + 1))
        indices = torch.randint(task.n_samples, (task.batch_size,), generator=generator)
        task.loss(model, task.batch(indices)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        print(f"pretrained {kind} ({steps} steps, {time.perf_counter() - start:.0f} s): validation "
              f"{task.evaluate(model):.4f}", flush=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def make_task(args):
    if args.setting.startswith("lm-"):
        if args.setting == "lm-scratch":
            return lm_task(args.size, device=args.device, epoch_steps=args.epoch_steps)
        init = _pretrained("lm", args.size, args.pretrain_steps, args.cache, 2e-3, args.device)
        return lm_task(args.size, "tests", init=init, prepare=lora(8) if args.setting == "lm-lora" else None,
                       device=args.device, epoch_steps=args.epoch_steps)
    if args.setting == "digits-scratch":
        return digits_task(device=args.device)
    init = _pretrained("digits", "resnet18", args.pretrain_steps, args.cache, 1e-3, args.device)
    return digits_task(range(5, 10), init=init, device=args.device)


def _best(curves, higher: bool):
    pick = max if higher else min
    return pick(curves, key=lambda c: c.final)


def run(args) -> dict:
    task = make_task(args)
    higher = task.higher_is_better
    lrs = sorted(args.lrs)
    log = lambda c: print(f"  {c.name:44s} lr {c.variant.lr:.1e} t {c.train_time_s:6.1f}s "  # noqa: E731
                          f"steps {c.steps:5d}  {c.points[-1]['value']:.4f}", flush=True)
    runs: list[dict] = []

    def record(seed: int, entries, curves) -> None:
        for (family, _), c in zip(entries, curves):
            runs.append({"seed": seed, "name": c.name, "family": family, "lr": c.variant.lr,
                         "steps": c.steps, "train_time_s": c.train_time_s, "compile_time_s": c.compile_time_s,
                         "flops_per_step": c.flops_per_step, "saved_bytes": c.saved_bytes,
                         "batch": task.batch_size, "kappa": c.variant.kappa, "points": c.points})

    only = args.families
    if args.lr is None:
        # 1. The sweep (seed 0): each family's first configuration at every rate.
        contestants = []
        for lr in lrs:
            for family, configs in families(lr, only).items():
                contestants.append((family, configs[0]))
        print(f"== {args.setting}: sweep at seed 0, {len(contestants)} runs of {args.budget} s", flush=True)
        curves = race(task, [v for _, v in contestants], budget_s=args.budget, seed=0, evals=args.evals,
                      compile=args.compile, weight_decay=args.weight_decay, on_point=log)
        record(0, contestants, curves)
        best_lr = {}
        for family in families(0, only):
            mine = [c for (f, _), c in zip(contestants, curves) if f == family]
            best_lr[family] = _best(mine, higher).variant.lr
        base_lr = best_lr["baseline"]
        inside = lrs[0] < base_lr < lrs[-1]
        print(f"== baseline's best rate {base_lr:g} ({'inside' if inside else 'AT THE EDGE OF'} the sweep); "
              f"families' own best: {best_lr}", flush=True)
        # The other configurations at the baseline's rate, seed 0.
        rest = [(family, dataclasses.replace(v, lr=base_lr)) for family, configs in families(base_lr, only).items()
                for v in configs[1:]]
        curves = race(task, [v for _, v in rest], budget_s=args.budget, seed=0, evals=args.evals,
                      compile=args.compile, weight_decay=args.weight_decay, on_point=log)
        record(0, rest, curves)
    else:  # --lr: no sweep; every configuration at that rate, for every seed
        base_lr, inside = args.lr, None
        best_lr = {family: args.lr for family in families(0, only)}
    # 2. More seeds: everything at the baseline's rate, and each family at its own best.
    for seed in args.seeds:
        if seed == 0 and args.lr is None:
            continue
        entries = [(family, v) for family, configs in families(base_lr, only).items() for v in configs]
        entries += [(family, families(lr, only)[family][0]) for family, lr in best_lr.items() if lr != base_lr]
        print(f"== seed {seed}: {len(entries)} runs", flush=True)
        curves = race(task, [v for _, v in entries], budget_s=args.budget, seed=seed, evals=args.evals,
                      compile=args.compile, weight_decay=args.weight_decay, on_point=log)
        record(seed, entries, curves)
    return {"setting": args.setting, "source": task.source, "higher_is_better": higher,
            "budget_s": args.budget, "lrs": lrs, "baseline_lr": base_lr, "baseline_lr_inside": inside,
            "best_lr": best_lr, "compile": args.compile, "seeds": sorted({0, *args.seeds}),
            "batch_size": task.batch_size, "epoch_steps": task.epoch_steps, "runs": runs, "meta": run_meta(args.device), "argv": sys.argv[1:]}


def summarise(result: dict) -> list[dict]:
    """One row per configuration and rate: means over seeds, time to the baseline's final figure."""
    higher = result["higher_is_better"]
    base_lr = result["baseline_lr"]
    baseline = {r["seed"]: r for r in result["runs"] if r["name"] == "baseline" and r["lr"] == base_lr}
    base_flops = statistics.mean(r["flops_per_step"]["full"] / r["batch"] for r in baseline.values())
    base_bytes = statistics.mean(r["saved_bytes"]["full"] for r in baseline.values())
    rows = {}
    for r in result["runs"]:
        rows.setdefault((r["name"], r["lr"]), []).append(r)
    table = []
    for (name, lr), runs in rows.items():
        finals = [r["points"][-1]["value"] for r in runs]
        reach = []
        for r in runs:
            if r["seed"] not in baseline:
                continue
            target = baseline[r["seed"]]["points"][-1]["value"]
            reach.append(time_to_reach(Curve(name, Variant("baseline", lr), points=r["points"]), target, higher))
        base_sample = statistics.mean(r["train_time_s"] / r["points"][-1]["samples"] for r in baseline.values())
        samples = [r["points"][-1]["samples"] for r in runs]
        flops = [r["points"][-1]["flops"] / max(1, s) for r, s in zip(runs, samples)]
        table.append({
            "name": name, "lr": lr, "seeds": len(runs), "final_mean": statistics.mean(finals),
            "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "steps": statistics.mean(r["steps"] for r in runs),
            "seconds_per_sample_vs_baseline":
                statistics.mean(r["train_time_s"] / r["points"][-1]["samples"] for r in runs) / base_sample,
            "flops_per_sample_vs_baseline": statistics.mean(flops) / base_flops,
            "saved_bytes_vs_baseline": max(max(r["saved_bytes"].values()) for r in runs) / base_bytes,
            "reached": sum(t is not None for t in reach), "compared": len(reach),
            "time_to_baseline_final_s": statistics.median([t for t in reach if t is not None])
            if any(t is not None for t in reach) else None,
            "compile_time_s": statistics.mean(r["compile_time_s"] for r in runs),
        })
    table.sort(key=lambda row: (row["lr"] != base_lr, row["name"] != "baseline", row["name"], row["lr"]))
    return table


def markdown(result: dict, table: list[dict]) -> str:
    figure = "accuracy" if result["higher_is_better"] else "validation loss"
    lines = [f"| configuration | LR | seeds | final {figure} | reached the baseline's final | time/sample | "
             "FLOPs/sample | saved activations | steps |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        reach = ("-" if row["name"] == "baseline" and row["lr"] == result["baseline_lr"]
                 else f"{row['reached']}/{row['compared']}" + (
                     f" (at {row['time_to_baseline_final_s']:.0f} s)" if row["reached"] else " (not reached)"))
        lines.append(f"| {row['name']} | {row['lr']:g} | {row['seeds']} | {row['final_mean']:.4f} "
                     f"± {row['final_sd']:.4f} | {reach} | {100 * (row['seconds_per_sample_vs_baseline'] - 1):+.0f}% | "
                     f"{100 * row['flops_per_sample_vs_baseline']:.0f}% | "
                     f"{100 * row['saved_bytes_vs_baseline']:.0f}% | {row['steps']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_lr = result["baseline_lr"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = []
    for r in result["runs"]:
        if r["lr"] == base_lr and r["name"] not in names:
            names.append(r["name"])
    for name in names:
        runs = [r for r in result["runs"] if r["name"] == name and r["lr"] == base_lr]
        style = {"linewidth": 2.5, "color": "black"} if name == "baseline" else {"linewidth": 1.2}
        for ax, key, scale in zip(axes, ("time_s", "steps", "flops"), (1, 1, 1e-12)):
            # The seed-0 curve (every run is in the JSON): the seeds' points do not share x values.
            run = min(runs, key=lambda r: r["seed"])
            ax.plot([p[key] * scale for p in run["points"]], [p["value"] for p in run["points"]],
                    label=name, **style)
    figure = "accuracy" if result["higher_is_better"] else "validation loss"
    for ax, label in zip(axes, ("training wall time (s)", "optimizer steps", "training FLOPs (10^12)")):
        ax.set_xlabel(label)
        ax.set_ylabel(figure)
        ax.grid(alpha=0.3)
    if not result["higher_is_better"]:
        lows = [p["value"] for r in result["runs"] for p in r["points"][len(r["points"]) // 3:]]
        for ax in axes:
            ax.set_ylim(min(lows) - 0.02, max(lows) + 0.05)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['setting']}: {figure}, seed 0, LR {base_lr:g} "
                 f"({'compiled' if result['compile'] else 'eager'}, {result['budget_s']} s each)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: dict, stem: str) -> str:
    """The JSON, the plot and the markdown table of a run; returns the table."""
    result["table"] = summarise(result)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, stem + ".png")
    text = markdown(result, result["table"])
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("setting", choices=SETTINGS, nargs="?")
    p.add_argument("--report", nargs="+", metavar="JSON", help="rewrite the tables and plots of these results")
    p.add_argument("--budget", type=float, default=None, help="training seconds per run (default: per setting)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="peak learning rates swept")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evals", type=int, default=10)
    p.add_argument("--size", default="small", choices=sorted(LmSize.presets), help="the LM's size preset")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="steps of the checkpoint fine-tuning starts from (default: 800 LM, 150 digits)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epoch-steps", type=int, default=10, help="the LM settings' steps per epoch (LayerDropBack's unit)")
    p.add_argument("--lr", type=float, default=None, help="no sweep: every configuration at this rate")
    p.add_argument("--families", nargs="+", default=None,
                   choices=["baseline", "ldb-k2", "ldb-k1", "dropbp-uniform", "dropbp-sensitivity"],
                   help="race only these families (the baseline is always needed)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/ldbfx"))
    p.add_argument("--out", default="benchmarks/results/time-to-loss")
    args = p.parse_args(argv)
    if args.report:
        for path in args.report:
            with open(path) as f:
                print(write(json.load(f), path.removesuffix(".json")))
        return 0
    if args.setting is None:
        p.error("give a setting, or --report JSON...")
    budget, lrs = DEFAULTS[args.setting]
    args.budget = args.budget or budget
    args.lrs = args.lrs or list(lrs)
    if args.families is not None and "baseline" not in args.families:
        p.error("--families must include baseline (every figure is relative to it)")
    args.pretrain_steps = args.pretrain_steps or (800 if args.setting.startswith("lm-") else 150)
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.setting}{'-compiled' if args.compile else ''}-{args.device.split(':')[0]}")
    print(write(result, stem))
    print(f"wrote {stem}.json, .png, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
