"""Branch drop (DropBP) vs LayerDropBack on the same layers: backward FLOPs and step time.

    python benchmarks/branch_drop.py --models resnet50 vit_b_16 --resolution 64 --batch 16 \
        --rates 0.1 0.3 0.5 --rounds 5 --out benchmarks/results/branch-drop.json

Per model and rate ``r``: ``round(r * eligible)`` eligible branches (a seeded random subset) and,
for comparison, LayerDropBack dropping the dW of exactly the layers inside those branches.

* FLOPs (eager, ``FlopCounterMode`` over the backward): ``baseline``; ``detached``, the semantic
  reference (the same branches' outputs detached before their adds, by forward hooks on the
  untransformed model); ``branch`` (ldbfx.set_dropped_branches); ``ldb`` (ldbfx.set_dropped).
* Step time (zero_grad + forward + cross-entropy + backward), eager and ``torch.compile``d
  (Inductor): ``baseline``, ``branch@r``, ``ldb@r``; compiled also ``branch@0`` (branch drop in
  use, nothing dropped: the cost of the graph breaks). Every variant runs one warm-up and
  ``--steps`` timed steps per round, rounds interleaved with a rotating order, minimum kept.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ldbfx
from ldbfx.app.bench import make_model, run_meta


def _subset(items, rate, seed=0):
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[: round(rate * len(items))])]


def bench(name: str, args) -> dict:
    torch.manual_seed(0)
    model = make_model(name, args.resolution)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    y = torch.randint(0, 1000, (args.batch,))
    params = list(model.parameters())
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    gm_branch, gm_ldb = ldbfx.transform(model), ldbfx.transform(model)
    eligible = [b for b in ldbfx.branches(gm_branch) if b.eligible]
    plans = {r: _subset(eligible, r) for r in args.rates}
    layers_in = {r: [layer for b in plans[r] for layer in b.layers
                     if next(l for l in ldbfx.layers(gm_ldb) if l.name == layer).eligible] for r in args.rates}

    def step(module):
        for p in params:
            p.grad = None
        F.cross_entropy(module(x), y).backward()

    def flops(module):
        loss = F.cross_entropy(module(x), y)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        for p in params:
            p.grad = None
        return counter.get_total_flops()

    row = {"model": name, "branches": len(ldbfx.branches(gm_branch)), "eligible": len(eligible), "rates": {}}
    base_flops = flops(model)
    outputs = {n: m for n, m in model.named_modules()}
    # A module layer's node keeps its name in ldbfx's graph (a rewritten BatchNorm is a function call).
    layer_module = {node: l.name for l in ldbfx.layers(gm_branch) if l.op == "call_module" for node in l.nodes}
    for r in args.rates:
        # The detached reference: hooks detach each dropped branch's output, found as the
        # producer of the gate's input in ldbfx's graph when it is a module call, else skipped.
        gates = [n for n in gm_branch.graph.nodes if n.meta.get("ldbfx_branch") in {b.index for b in plans[r]}]
        handles = []
        for gate in gates:
            src = gate.args[0]
            module = src.target if src.op == "call_module" else layer_module.get(src.name)
            if module in outputs:
                handles.append(outputs[module].register_forward_hook(lambda m, i, o: o.detach()))
        detached = flops(model) if len(handles) == len(gates) else None
        for h in handles:
            h.remove()
        ldbfx.set_dropped_branches(gm_branch, plans[r])
        branch = flops(gm_branch)
        ldbfx.set_dropped_branches(gm_branch, [])
        ldbfx.set_dropped(gm_ldb, layers_in[r])
        ldb = flops(gm_ldb)
        ldbfx.set_dropped(gm_ldb, [])
        row["rates"][str(r)] = {"branches_dropped": len(plans[r]), "layers_inside": len(layers_in[r]),
                                "flops_baseline": base_flops, "flops_detached": detached,
                                "flops_branch": branch, "flops_ldb": ldb,
                                "flops_saved_branch": 1 - branch / base_flops, "flops_saved_ldb": 1 - ldb / base_flops}

    def variants(modules):
        base, branch_gm, ldb_gm = modules
        out = {"baseline": (base, lambda: None)}
        if args.compiled:
            out["branch@0"] = (branch_gm, lambda: ldbfx.set_dropped_branches(gm_branch, []))
        for r in args.rates:
            out[f"branch@{r}"] = (branch_gm, lambda r=r: (ldbfx.set_dropped_branches(gm_branch, plans[r]),
                                                          ldbfx.set_dropped(gm_ldb, [])))
            out[f"ldb@{r}"] = (ldb_gm, lambda r=r: (ldbfx.set_dropped(gm_ldb, layers_in[r]),
                                                    ldbfx.set_dropped_branches(gm_branch, [])))
        return out

    def timed(table, rounds):
        names = list(table)
        compile_s = {}
        for n in names:  # warm-up (compiles)
            module, setup = table[n]
            setup()
            start = time.perf_counter()
            step(module)
            compile_s[n] = round(time.perf_counter() - start, 1)
        times = {n: [] for n in names}
        for k in range(rounds):
            for n in names[k % len(names):] + names[: k % len(names)]:
                module, setup = table[n]
                setup()
                step(module)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(module)
                times[n].append((time.perf_counter() - start) / args.steps)
        best = {n: min(t) for n, t in times.items()}
        return {"ms": {n: round(1e3 * t, 1) for n, t in best.items()},
                "saving": {n: round(1 - t / best["baseline"], 4) for n, t in best.items() if n != "baseline"},
                "first_call_s": compile_s}

    row["eager"] = timed(variants((model, gm_branch, gm_ldb)), args.rounds)
    if args.compiled:
        gm_branch.ldbfx_state.branch_cut = True  # branch drop in use from the start: one compile
        compiled = (torch.compile(model), torch.compile(gm_branch), torch.compile(gm_ldb))
        torch._dynamo.utils.counters.clear()
        row["compiled"] = timed(variants(compiled), args.rounds)
        row["compiled"]["dynamo_frames_ok"] = torch._dynamo.utils.counters["frames"]["ok"]
    ldbfx.set_dropped_branches(gm_branch, [])
    ldbfx.set_dropped(gm_ldb, [])
    print(json.dumps(row), flush=True)
    return row


def report(rows) -> list[str]:
    lines = []
    for row in rows:
        for r, f in row["rates"].items():
            ref = "n/a" if f["flops_detached"] is None else (
                "equal" if f["flops_detached"] == f["flops_branch"] else "DIFFER")
            line = (f"{row['model']} rate {r} ({f['branches_dropped']} branches, {f['layers_inside']} layers): "
                    f"backward FLOPs saved branch {100 * f['flops_saved_branch']:.1f}% (detached reference: {ref}), "
                    f"ldb {100 * f['flops_saved_ldb']:.1f}%")
            for mode in ("eager", "compiled"):
                if mode in row:
                    s = row[mode]["saving"]
                    line += f"; {mode} time saved branch {100 * s[f'branch@{r}']:.1f}% ldb {100 * s[f'ldb@{r}']:.1f}%"
            lines.append(line)
        if "compiled" in row:
            lines.append(f"{row['model']}: compiled branch drop with nothing dropped costs "
                         f"{-100 * row['compiled']['saving']['branch@0']:+.1f}% (the graph breaks)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-compiled", dest="compiled", action="store_false")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [bench(name, args) for name in args.models]
    lines = report(rows)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": run_meta("cpu") | {"args": vars(args)}, "rows": rows, "checks": lines}, f, indent=1)


if __name__ == "__main__":
    main()
