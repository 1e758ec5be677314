"""``ldbfx demo``: baseline vs LayerDropBack on embedded real data, with an honest speed-up.

With ``--dropbp [RATE]`` a third run trains with DropBP (whole residual branches dropped, dX and
dW, at every step) and gets its own column.

Both runs use the same seed, data order, epochs and model. The demo then splits LDB's gain per
sample into its two sources, measured directly on the LDB model:

* **larger batch** (eq. 4's ``kappa``): full backprop at ``kappa * B`` vs at ``B``;
* **skipped weight gradients**: LDB's random masks at ``kappa * B`` vs full backprop at ``kappa * B``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from . import data as datasets
from ..analysis.layers import layers as _layers
from ..runtime.mask import set_dropped
from ..policies import draw_dropped
from ..rewrite.driver import transform
from .train import RunResult, TrainConfig, _sync, build_model, train, write_log

__all__ = ["run_demo", "decompose_speedup"]


def decompose_speedup(config: TrainConfig, steps: int = 4, rounds: int = 5) -> dict[str, float]:
    """Seconds per sample of: full backprop at B, full at kappa*B, LDB masks at kappa*B.

    Each variant runs in blocks of consecutive steps, as in training (DROP steps follow DROP steps;
    interleaving single steps of different variants measured up to 2x different savings on CPU,
    where the allocator's reuse depends on the pattern). Blocks rotate order across rounds; the
    median over rounds of each block's median is kept. Forward + backward only.
    """
    torch.manual_seed(config.seed)
    splits = datasets.load(config.data, config.data_dir, image_size=config.image_size, seed=config.seed)
    model = build_model(config.model, splits.num_classes).to(config.device)
    gm = transform(model)
    net = torch.compile(gm) if config.compile else gm
    eligible = tuple(l.index for l in _layers(gm) if l.eligible)
    big = int(round(config.batch_size * config.kappa))
    x_all = torch.stack([splits.train[i][0] for i in range(big)]).to(config.device)
    y_all = torch.tensor([int(splits.train[i][1]) for i in range(big)], device=config.device)
    generator = torch.Generator().manual_seed(config.seed)
    variants = {"full_B": (config.batch_size, False), "full_kB": (big, False), "drop_kB": (big, True)}

    def one_step(batch: int, drop: bool) -> float:
        set_dropped(gm, draw_dropped(generator, eligible, config.drop_rate) if drop else ())
        x, y = x_all[:batch], y_all[:batch]
        _sync(config.device)
        start = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        _sync(config.device)
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed / batch

    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            one_step(*variants[name])  # warm-up (and compile) of the block
            times[name].append(statistics.median(one_step(*variants[name]) for _ in range(steps)))
    set_dropped(gm, ())
    return {name: statistics.median(t) for name, t in times.items()}


def _table(base: RunResult, ldb: RunResult, parts: dict[str, float], dropbp: RunResult | None = None) -> str:
    speedup = base.train_time / ldb.train_time - 1
    drop_rows = [r for r in ldb.history if r["mode"] == "drop"]
    full_rows = [r for r in ldb.history if r["mode"] == "full"]
    skipped = statistics.mean(r["bwd_flops_skipped"] for r in drop_rows) if drop_rows else 0.0
    gain = parts["full_B"] - parts["drop_kB"]
    from_batch = (parts["full_B"] - parts["full_kB"]) / gain if gain > 0 else float("nan")
    # Expected speed-up from the controlled per-sample times and the epoch schedule.
    n_drop, n_full = len(drop_rows), len(full_rows)
    expected = (n_drop + n_full) * parts["full_B"] / (n_full * parts["full_B"] + n_drop * parts["drop_kB"]) - 1
    rows = [
        ("", "baseline", "LayerDropBack"),
        ("train wall time (s)", f"{base.train_time:.1f}", f"{ldb.train_time:.1f}"),
        ("speed-up, wall clock (one run, noisy)", "", f"{100 * speedup:+.1f}%"),
        ("speed-up, controlled estimate", "", f"{100 * expected:+.1f}%"),
        ("final test accuracy", f"{100 * base.final_accuracy:.2f}%", f"{100 * ldb.final_accuracy:.2f}%"),
        ("DROP / full epochs", f"0 / {len(base.history)}", f"{len(drop_rows)} / {len(full_rows)}"),
        ("bwd FLOPs skipped in DROP epochs", "", f"{100 * skipped:.1f}%"),
        ("time/sample full epochs (ms)",
         f"{1e3 * statistics.mean(r['time_per_sample'] for r in base.history):.3f}",
         f"{1e3 * statistics.mean(r['time_per_sample'] for r in full_rows):.3f}" if full_rows else "-"),
        ("time/sample DROP epochs (ms)", "",
         f"{1e3 * statistics.mean(r['time_per_sample'] for r in drop_rows):.3f}" if drop_rows else "-"),
        ("DROP-step time/sample vs full (controlled)", "",
         f"{100 * (parts['drop_kB'] / parts['full_B'] - 1):+.1f}%"),
        ("  from larger batch (kappa)", "", f"{100 * from_batch:.0f}% of that gain"),
        ("  from skipped dW", "", f"{100 * (1 - from_batch):.0f}% of that gain"),
    ]
    if dropbp is not None:
        # DropBP has no DROP epochs or larger batch: every step drops, at the batch size of B.
        only = {
            "": "DropBP", "train wall time (s)": f"{dropbp.train_time:.1f}",
            "speed-up, wall clock (one run, noisy)": f"{100 * (base.train_time / dropbp.train_time - 1):+.1f}%",
            "final test accuracy": f"{100 * dropbp.final_accuracy:.2f}%",
            "DROP / full epochs": "every step",
            "bwd FLOPs skipped in DROP epochs": "{:.1f}%".format(
                100 * statistics.mean(r["bwd_flops_skipped"] for r in dropbp.history)),
            "time/sample DROP epochs (ms)": f"{1e3 * statistics.mean(r['time_per_sample'] for r in dropbp.history):.3f}",
        }
        rows = [(*r, only.get(r[0], "-" if r[2] else "")) for r in rows]
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows)


def _plot(base: RunResult, ldb: RunResult, path: str, dropbp: RunResult | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    runs = ((base, "baseline"), (ldb, "LayerDropBack")) + (((dropbp, "DropBP"),) if dropbp else ())
    for result, label in runs:
        epochs = [r["epoch"] for r in result.history]
        axes[0].plot(epochs, [r["train_loss"] for r in result.history], marker="o", label=label)
        axes[1].plot(epochs, [100 * r["test_acc"] for r in result.history], marker="o", label=label)
        axes[2].plot(epochs, [r["epoch_time"] for r in result.history], marker="o", label=label)
    for epoch in (r["epoch"] for r in ldb.history if r["mode"] == "drop"):
        for ax in axes:
            ax.axvspan(epoch - 0.5, epoch + 0.5, color="tab:orange", alpha=0.08)
    for ax, title in zip(axes, ("train loss", "test accuracy (%)", "epoch time (s)")):
        ax.set_title(title)
        ax.set_xlabel("epoch (shaded: DROP epochs)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(config: TrainConfig, out_dir: str = "ldbfx-out", print_fn=print,
             dropbp_rate: float | None = None) -> dict:
    """Runs baseline and LDB (and DropBP at ``dropbp_rate`` when given), prints the comparison,
    writes ``demo.png`` and ``demo.json``."""
    os.makedirs(out_dir, exist_ok=True)
    print_fn(f"ldbfx demo: {config.model} on {config.data} ({config.epochs} epochs, batch "
             f"{config.batch_size}, seed {config.seed}); baseline first, then LayerDropBack "
             f"(drop_rate={config.drop_rate}, period={config.period}, kappa={config.kappa})")

    def report(name):
        return lambda r: print_fn(f"  {name:>8} epoch {r['epoch']:>2} {r['mode']:>4}  loss {r['train_loss']:.3f}"
                                  f"  acc {100 * r['test_acc']:.2f}%  {r['epoch_time']:.1f}s")

    base = train(replace(config, policy="none"), on_epoch=report("baseline"))
    ldb = train(replace(config, policy="ldb"), on_epoch=report("LDB"))
    dropbp = None
    if dropbp_rate is not None:
        rates = (f"with p = {dropbp_rate}" if config.dropbp_allocation == "uniform"
                 else f"with sensitivity-allocated rates averaging {dropbp_rate} of the FLOPs")
        print_fn(f"  then DropBP (eligible residual branches dropped {rates} at every step)")
        dropbp = train(replace(config, policy="dropbp", drop_rate=dropbp_rate), on_epoch=report("DropBP"))
    parts = decompose_speedup(config)
    table = _table(base, ldb, parts, dropbp)
    print_fn("\n" + table)
    _plot(base, ldb, os.path.join(out_dir, "demo.png"), dropbp)
    write_log(base, out_dir, "baseline")
    write_log(ldb, out_dir, "ldb")
    if dropbp is not None:
        write_log(dropbp, out_dir, "dropbp")
    figures = {
        "config": ldb.config, "baseline": base.history, "ldb": ldb.history,
        "train_time": {"baseline": base.train_time, "ldb": ldb.train_time},
        "speedup_wall_clock": base.train_time / ldb.train_time - 1,
        "final_accuracy": {"baseline": base.final_accuracy, "ldb": ldb.final_accuracy},
        "seconds_per_sample": parts,
        "layers": {"total": ldb.layers_total, "eligible": ldb.layers_eligible},
    }
    if dropbp is not None:
        figures["dropbp"] = dropbp.history
        figures["train_time"]["dropbp"] = dropbp.train_time
        figures["final_accuracy"]["dropbp"] = dropbp.final_accuracy
        figures["speedup_wall_clock_dropbp"] = base.train_time / dropbp.train_time - 1
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print_fn(f"\nwrote {out_dir}/demo.png, {out_dir}/demo.json and per-run logs")
    return figures
