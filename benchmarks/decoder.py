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

    python benchmarks/decoder.py --rounds 6 --out benchmarks/results/2026-12-01-cpu-decoder.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldbfx
from ldbfx.bench import run_meta


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
        def run_step():
            ldbfx.set_dropped(gm, drop)
            try:
                step(module, batch, params)
            finally:
                ldbfx.set_dropped(gm, [])
        return run_step

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
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
