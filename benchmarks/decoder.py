"""A transformer decoder through the torch.export front end: FLOPs and step time vs the ideal.

A random-init Llama (Hugging Face transformers, no download) captured with
``ldbfx.transform(model, example_kwargs=batch)``. For drop fractions of the eligible layers (the
same random subset for every method) it measures, in one process with interleaved rounds and the
minimum over rounds (this VM's timing noise only adds time):

* ``model``: the untransformed model, full backward (what the user runs today);
* ``ideal``: the same model with the dropped layers frozen (``requires_grad=False``); compiled,
  one compile per mask (which is why it cannot train with changing masks);
* ``ldbfx``: the transformed model with ``set_dropped``; compiled once for every mask.

A step is zero_grad + forward + backward of the causal-LM loss. FLOPs are the backward's
(``FlopCounterMode``).

With ``--branches``, the same fractions of the eligible residual branches (attention and MLP of
each decoder layer, found by ldbfx) are also dropped whole (``set_dropped_branches``, on a second
capture so that the layer-drop model keeps its single compiled graph), beside their semantic
reference: the untransformed model with forward hooks detaching the same branches' outputs.
``--compile-branches`` times that second capture compiled too (it compiles into regions split
around every eligible branch: slow to compile).

    python benchmarks/decoder.py --rounds 6 --out benchmarks/results/2026-12-01-cpu-decoder.json
    python benchmarks/decoder.py --branches --no-compile --rounds 8 --out F
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldbfx
from ldbfx.app.bench import run_meta


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                         use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def step(module, batch, params):
    for p in params:
        p.grad = None
    module(**batch).loss.backward()


def dropping_step(set_drops, drop, module, batch, params):
    """A step of ``module`` with ``set_drops(drop)`` in effect (layers or branches), then none."""
    def run_step():
        set_drops(drop)
        try:
            step(module, batch, params)
        finally:
            set_drops([])
    return run_step


def backward_flops(module, batch):
    loss = module(**batch).loss
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--branches", action="store_true", help="also drop whole residual branches")
    parser.add_argument("--compile-branches", action="store_true", help="with --branches: time them compiled")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = make_model(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    gm = ldbfx.transform(model, example_kwargs=batch)
    params = list(model.parameters())
    named = dict(model.named_parameters())
    eligible = [l for l in ldbfx.layers(gm) if l.eligible]
    order = random.Random(0).sample(eligible, len(eligible))
    drops = {f: order[:round(f * len(eligible))] for f in args.fractions}

    def frozen(drop, module=model):
        """The ideal: ``module`` (the model, or a compile of it for this one mask) with the
        dropped layers frozen."""
        names = {p for l in drop for p in l.params}

        def run_step():
            for n in names:
                named[n].requires_grad_(False)
            try:
                step(module, batch, params)
            finally:
                for n in names:
                    named[n].requires_grad_(True)
        return run_step

    def masked(drop, module=gm):
        return dropping_step(lambda d: ldbfx.set_dropped(gm, d), drop, module, batch, params)

    results = {"meta": {**run_meta("cpu"), "command": "python benchmarks/decoder.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "no_compile", "fractions"))
        + " --fractions " + " ".join(map(str, args.fractions)),
        "model": f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}",
        "eligible_layers": len(eligible)}, "rows": []}

    flops_full = backward_flops(model, batch)
    variants = {"model": lambda: step(model, batch, params)}
    for f, drop in drops.items():
        names = {p for l in drop for p in l.params}
        for n in names:
            named[n].requires_grad_(False)
        ideal_flops = backward_flops(model, batch)
        for n in names:
            named[n].requires_grad_(True)
        ldbfx.set_dropped(gm, drop)
        ldb_flops = backward_flops(gm, batch)
        ldbfx.set_dropped(gm, [])
        model.zero_grad(set_to_none=True)
        results["rows"].append({"fraction": f, "dropped": len(drop), "flops_full": flops_full,
                                "flops_ideal": ideal_flops, "flops_ldbfx": ldb_flops})
        variants[f"ideal@{f}"] = frozen(drop)
        variants[f"ldbfx@{f}"] = masked(drop)
    if args.branches:
        add_branch_variants(args, model, batch, params, drops, variants, results, flops_full)
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = 64
        compiled_model = torch.compile(model)
        compiled_gm = torch.compile(gm)
        variants["compiled model"] = lambda: step(compiled_model, batch, params)
        for f, drop in drops.items():
            variants[f"compiled ideal@{f}"] = frozen(drop, torch.compile(model))  # a fresh compile
            variants[f"compiled ldbfx@{f}"] = masked(drop, compiled_gm)

    for fn in variants.values():  # warm-up (and compiles)
        fn(), fn()
    times = {k: [] for k in variants}
    keys = list(variants)
    for r in range(args.rounds):
        rotated = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in rotated:
            start = time.perf_counter()
            for _ in range(args.steps):
                variants[k]()
            times[k].append((time.perf_counter() - start) / args.steps * 1000)
    best = {k: min(v) for k, v in times.items()}
    for row in results.get("branch_rows", []):
        f = row["fraction"]
        row["ms_model"], row["ms_detached"], row["ms_branch"] = (
            round(best[k], 2) for k in ("model", f"detached@{f}", f"branch@{f}"))
        if f"compiled branch@{f}" in best and "compiled model" in best:
            row["compiled ms_model"] = round(best["compiled model"], 2)
            row["compiled ms_branch"] = round(best[f"compiled branch@{f}"], 2)
    for row in results["rows"]:
        f = row["fraction"]
        for prefix in ("", "compiled ") if not args.no_compile else ("",):
            base = best[f"{prefix}model"]
            row[f"{prefix}ms_model"] = round(base, 2)
            row[f"{prefix}ms_ideal"] = round(best[f"{prefix}ideal@{f}"], 2)
            row[f"{prefix}ms_ldbfx"] = round(best[f"{prefix}ldbfx@{f}"], 2)
    results["times_ms"] = {k: [round(t, 2) for t in v] for k, v in times.items()}
    print(results["meta"]["model"], f"({len(eligible)} eligible layers)")
    print("fraction  dW-FLOPs saved: ideal / ldbfx   eager ms: model / ideal / ldbfx   compiled ms: model / ideal / ldbfx")
    for row in results["rows"]:
        ideal, ldb = (100 * (1 - row[k] / row["flops_full"]) for k in ("flops_ideal", "flops_ldbfx"))
        line = (f"{row['fraction']:<9} {ideal:6.1f}% / {ldb:6.1f}%        "
                f"{row['ms_model']:7.1f} / {row['ms_ideal']:7.1f} / {row['ms_ldbfx']:7.1f}")
        if not args.no_compile:
            line += (f"     {row['compiled ms_model']:7.1f} / {row['compiled ms_ideal']:7.1f} / "
                     f"{row['compiled ms_ldbfx']:7.1f}")
        print(line)
    if results.get("branch_rows"):
        print(f"branches ({results['meta']['eligible_branches']} eligible)  backward FLOPs saved: detached / "
              "branch   eager ms: model / detached / branch   compiled ms: model / branch")
        for row in results["branch_rows"]:
            ref, ours = (100 * (1 - row[k] / row["flops_full"]) for k in ("flops_detached", "flops_branch"))
            line = (f"{row['fraction']:<9} {row['dropped']:>2} dropped  {ref:6.1f}% / {ours:6.1f}%   "
                    f"{row['ms_model']:7.1f} / {row['ms_detached']:7.1f} / {row['ms_branch']:7.1f}")
            if "compiled ms_branch" in row:
                line += f"     {row['compiled ms_model']:7.1f} / {row['compiled ms_branch']:7.1f}"
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


@contextlib.contextmanager
def detaching(model, names):
    """The semantic reference of dropped branches: each named submodule's outputs detached."""
    def hook(module, inputs, output):
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, output)

    handles = [model.get_submodule(n).register_forward_hook(hook) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def add_branch_variants(args, model, batch, params, drops, variants, results, flops_full):
    """Whole-branch drop on a second capture, and its detached reference (see the module doc)."""
    gb = ldbfx.transform(model, example_kwargs=batch)
    eligible = [b for b in ldbfx.branches(gb) if b.eligible]
    order = random.Random(0).sample(eligible, len(eligible))
    results["meta"]["eligible_branches"] = len(eligible)
    results["meta"]["branches"] = [b.name for b in ldbfx.branches(gb)]
    results["branch_rows"] = []

    def detached(names):
        def run_step():
            with detaching(model, names):
                step(model, batch, params)
        return run_step

    def branched(names, module=gb):
        return dropping_step(lambda d: ldbfx.set_dropped_branches(gb, d), names, module, batch, params)

    compiled = torch.compile(gb) if args.compile_branches else None
    for f in drops:
        names = [b.name for b in order[:round(f * len(eligible))]]
        ref = detached(names)
        with detaching(model, names):
            ref_flops = backward_flops(model, batch)
        ldbfx.set_dropped_branches(gb, names)
        ours = backward_flops(gb, batch)
        ldbfx.set_dropped_branches(gb, [])
        model.zero_grad(set_to_none=True)
        results["branch_rows"].append({"fraction": f, "dropped": len(names), "branches": names,
                                       "flops_full": flops_full, "flops_detached": ref_flops,
                                       "flops_branch": ours})
        variants[f"detached@{f}"] = ref
        variants[f"branch@{f}"] = branched(names)
        if compiled is not None:
            variants[f"compiled branch@{f}"] = branched(names, compiled)


if __name__ == "__main__":
    main()
