"""``ldbfx demo --task lm``: does a language model reach the same loss sooner? Measured, side by side.

A byte-level Llama (Hugging Face ``transformers``, random init, 6 layers, hidden 128) learns the
Python standard library's own source, which every machine has, from scratch: the one setting in
which the time-to-loss benchmark saw DropBP pay on 2 CPU cores (its defaults: 20 s each, DropBP
0.5, AdamW at 2e-3, DropBP's best rate there). The baseline and DropBP (whole
attention and MLP branches dropped in the backward, at every step) each get the same training
wall time, on the same batches, taking turns (:mod:`ldbfx.app.race`); evaluation is not timed. The
table says how many steps each made, what a sample cost in FLOPs, the validation loss each
reached, and whether DropBP reached the baseline's final loss sooner.

What the time-to-loss benchmark found on 2 CPU cores (docs/benchmarks.md, "Does training reach
the same loss sooner?") is printed with the table, so the demo's one run is read against three
seeds and a learning-rate sweep.
"""

from __future__ import annotations

import json
import os

from .race import Variant, race, time_to_reach, value_at

__all__ = ["run_lm_demo", "VERDICT"]

#: The benchmark's verdict, printed under the table (kept in step with docs/benchmarks.md).
VERDICT = (
    "What the time-to-loss benchmark measured on 2 CPU cores (docs/benchmarks.md, 'Does training "
    "reach the same loss sooner?'; 3 seeds, tuned learning rates): from scratch, in the first 20 s "
    "(about 110 baseline steps, still on the byte-frequency plateau), DropBP 0.5 reached the "
    "baseline's final loss in about 13 s (2.72 vs 2.85 nats per byte at its best rate). Fine-tuning "
    "the same model, with LoRA or all weights, it did not: 19% less time per sample, and it ended "
    "0.005-0.011 above the baseline. LayerDropBack saved at most 7% of the time per sample on text "
    "and reached the baseline's final loss in at most one seed of three. "
    "Longer runs and GPUs are not measured yet: `bash benchmarks/gpu.sh` races LoRA at a GPU size.")


def _table(curves, higher: bool) -> str:
    base = curves[0]
    rows = [("", *(c.name for c in curves))]
    rows.append(("optimizer steps", *(str(c.steps) for c in curves)))
    rows.append(("seconds per step", *(f"{c.train_time_s / max(1, c.steps):.3f}" for c in curves)))
    flops = [c.points[-1]["flops"] / max(1, c.points[-1]["samples"]) for c in curves]
    rows.append(("FLOPs per sample vs baseline", *(f"{100 * f / flops[0]:.0f}%" for f in flops)))
    rows.append(("validation loss at the start", *(f"{c.points[0]['value']:.4f}" for c in curves)))
    rows.append(("validation loss at the end", *(f"{c.final:.4f}" for c in curves)))
    reach = []
    for c in curves:
        t = time_to_reach(c, base.final, higher)
        reach.append("-" if c is base else (f"at {t:.0f} s of {c.train_time_s:.0f}" if t is not None else "not reached"))
    rows.append(("reached the baseline's final loss", *reach))
    half = base.train_time_s / 2
    rows.append((f"loss at {half:.0f} s", *(f"{value_at(c, half):.4f}" for c in curves)))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip() for row in rows)


def _plot(curves, path: str, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in curves:
        style = {"linewidth": 2.5, "color": "black"} if c is curves[0] else {"linewidth": 1.5}
        axes[0].plot([p["time_s"] for p in c.points], [p["value"] for p in c.points], label=c.name, **style)
        axes[1].plot([p["steps"] for p in c.points], [p["value"] for p in c.points], label=c.name, **style)
    for ax, label in zip(axes, ("training wall time (s)", "optimizer steps")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats per byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"byte-level Llama on the standard library's source, {budget:g} s of training each")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_lm_demo(*, budget_s: float = 20.0, lr: float = 2e-3, dropbp_rate: float = 0.5, seed: int = 0,
                size: str = "small", out_dir: str = "ldbfx-out", print_fn=print) -> dict:
    """Races the baseline and DropBP for ``budget_s`` seconds of training each; prints the table and
    the benchmark's verdict, writes ``lm-demo.png`` and ``lm-demo.json``.

    Args:
        budget_s: training wall time each run gets.
        lr: AdamW's peak learning rate (warmup 5% of the budget, then cosine).
        dropbp_rate: DropBP's drop rate for every eligible branch.
        seed: initialisation, batches and drop masks.
        size: the model preset (``"small"``: 6 layers, hidden 128, sequences of 128 bytes, batch 16;
            ``"tiny"`` for tests).
        out_dir: where the plot and the JSON go.
        print_fn: where the progress and the table go.

    Returns:
        The figures written to ``lm-demo.json``.
    """
    from .workloads import lm_task

    os.makedirs(out_dir, exist_ok=True)
    task = lm_task(size)
    variants = [Variant("baseline", lr), Variant("dropbp", lr, drop_rate=dropbp_rate)]
    print_fn(f"ldbfx demo --task lm: a byte-level Llama ({size}) on {task.source}; baseline and DropBP "
             f"{dropbp_rate:g} take turns on the same batches, {budget_s:g} s of training each (seed {seed})")

    def progress(curve) -> None:
        print_fn(f"  {curve.name:22s} {curve.train_time_s:5.0f} s  {curve.steps:5d} steps  "
                 f"validation loss {curve.points[-1]['value']:.4f}")

    curves = race(task, variants, budget_s=budget_s, seed=seed, evals=6, weight_decay=0.01, on_point=progress)
    table = _table(curves, task.higher_is_better)
    print_fn("\n" + table + "\n\n" + VERDICT)
    _plot(curves, os.path.join(out_dir, "lm-demo.png"), budget_s)
    figures = {"source": task.source, "budget_s": budget_s, "lr": lr, "seed": seed, "size": size,
               "runs": {c.name: {"steps": c.steps, "train_time_s": c.train_time_s, "points": c.points,
                                 "flops_per_step": c.flops_per_step} for c in curves}}
    with open(os.path.join(out_dir, "lm-demo.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print_fn(f"\nwrote {out_dir}/lm-demo.png and {out_dir}/lm-demo.json")
    return figures
