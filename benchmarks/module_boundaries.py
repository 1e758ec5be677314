"""Module boundaries (per-block install): what checkpointing, regional compile and FSDP2 per block
cost and save against the whole graph and the untransformed model.

A random-init Hugging Face Llama (no download), captured with torch.export and installed per
block (``ldbfx.install(model, gm, blocks="auto", example_kwargs=batch)``). Four questions, one
subcommand each, all variants of a subcommand in one process (interleaved rounds, minimum over
rounds) unless said:

* ``checkpoint``: with Hugging Face's activation checkpointing (non-reentrant, and reentrant),
  branches dropped vs not: the backward's FLOPs (recompute included, ``FlopCounterMode``), how many
  blocks the backward recomputes, the bytes autograd holds for the backward when the forward
  returns, the step time. The same without checkpointing beside it.
* ``compile``: first compiled step (compile time) and steady step of the whole graph
  (``torch.compile(model)`` over the whole-graph install) against ``block.compile()`` per block,
  and the first step after the first branch drop (one recompile). One fresh process and Inductor
  cache per variant.
* ``fsdp``: the peak of unsharded parameters (elements) in a step on 2 gloo ranks: FSDP2 at the
  root of the whole graph (the only way before per-block install) vs per block + root, and the
  untransformed model per block + root.
* ``step``: the eager step's hot path: untransformed, whole graph, per block; nothing dropped and
  a quarter of the branches dropped.

    python benchmarks/module_boundaries.py checkpoint --out benchmarks/results/DATE-cpu-module-boundaries.jsonl
    python benchmarks/module_boundaries.py compile --out ...   # appends: one JSON line per subcommand
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldbfx
from ldbfx.app.bench import run_meta
from ldbfx.integrations.blocks import block_graphs


def make_model(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 64, 1), use_cache=False, attn_implementation="sdpa",
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_batch(batch: int, seq: int):
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def per_block(model, batch):
    gm = ldbfx.transform(model, example_kwargs=batch)
    ldbfx.install(model, gm, blocks="auto", example_kwargs=batch)
    return gm


class _Held:
    """What autograd stores for a saved tensor while measuring: a plain object, freed exactly when
    the graph node holding it is (a tensor's own Python object may outlive its node)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def held_bytes(fn) -> int:
    """The bytes autograd holds for the backward once ``fn()`` (a forward) has returned: storages
    of saved tensors still held by its graph, parameters excluded (tensors saved and freed with a
    detached branch's graph do not count)."""
    import weakref

    held = []

    def pack(t):
        holder = _Held(t)
        if not isinstance(t, torch.nn.Parameter):
            held.append((weakref.ref(holder), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        out = fn()
    storages = {ptr: n for ref, ptr, n in held if ref() is not None}
    del out
    return sum(storages.values())


def timed(fn, rounds, variants):
    """Each variant ``fn(name)`` once per round, rounds in rotated order; minimum per variant."""
    best = {name: float("inf") for name in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name in order:
            start = time.perf_counter()
            fn(name)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(seconds * 1000, 2) for name, seconds in best.items()}


# -- checkpoint ------------------------------------------------------------------------------------
def checkpoint(args) -> dict:
    batch = make_batch(args.batch, args.seq)
    plain = make_model(args.hidden, args.layers)
    model = make_model(args.hidden, args.layers)
    gm = per_block(model, batch)
    last = args.layers - 1
    middle = range(1, last)  # DropBP's default keeps the first and last blocks' branches
    drops = {
        "none": [],
        "mlp of the middle blocks": [f"model.layers.{i}.mlp" for i in middle],
        "attention of the middle blocks": [f"model.layers.{i}.self_attn" for i in middle],
        "both branches of the middle blocks": [f"model.layers.{i}.{b}" for i in middle for b in ("self_attn", "mlp")],
    }
    graphs = list(block_graphs(model).values())
    cls = type(graphs[0])
    forward, calls = cls.forward, [0]

    def counting(self, *a, **k):
        calls[0] += 1
        return forward(self, *a, **k)

    cls.forward = counting
    rows = []
    for mode in ("off", "non-reentrant", "reentrant"):
        for m in (plain, model):
            m.gradient_checkpointing_disable()
            if mode != "off":
                m.gradient_checkpointing_enable({"use_reentrant": mode == "reentrant"})
            m.train()

        def step(name):
            target = plain if name == "untransformed" else model
            if target is model:
                ldbfx.set_dropped_branches(gm, drops[name])
            target.zero_grad(set_to_none=True)
            target(**batch).loss.backward()

        names = ["untransformed", *drops]
        for name in names:
            target = plain if name == "untransformed" else model
            if target is model:
                ldbfx.set_dropped_branches(gm, drops[name])
            target.zero_grad(set_to_none=True)
            saved = held_bytes(lambda: target(**batch).loss)
            calls[0] = 0
            loss = target(**batch).loss
            forward_calls = calls[0]
            with FlopCounterMode(display=False) as counter:
                loss.backward()
            rows.append({"checkpointing": mode, "variant": name, "held_bytes": saved,
                         "backward_flops": counter.get_total_flops(),
                         "blocks_recomputed": None if target is plain else calls[0] - forward_calls})
        times = timed(step, args.rounds, names)
        for row in rows[-len(names):]:
            row["step_ms"] = times[row["variant"]]
    cls.forward = forward
    return {"rows": rows}


# -- compile -------------------------------------------------------------------------------------
def compile_one(args) -> dict:
    """One variant in this (fresh) process: ``args.variant`` in whole / blocks / plain-blocks."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.config.cache_size_limit = 8  # the default: a fallback to eager would show
    batch = make_batch(args.batch, args.seq)
    model = make_model(args.hidden, args.layers)
    start = time.perf_counter()
    gm = None
    if args.variant == "whole":
        gm = ldbfx.transform(model, example_kwargs=batch)
        ldbfx.install(model, gm)
        runner = torch.compile(model)
    else:
        if args.variant == "blocks":
            gm = per_block(model, batch)
        for layer in model.model.layers:
            layer.compile()
        runner = model
    capture = time.perf_counter() - start

    def step():
        model.zero_grad(set_to_none=True)
        runner(**batch).loss.backward()

    first = _seconds(step)
    steady = min(_seconds(step) for _ in range(args.rounds))
    result = {"variant": args.variant, "capture_s": round(capture, 2), "first_step_s": round(first, 2),
              "steady_step_ms": round(steady * 1000, 2)}
    if gm is not None:
        branches = [b.name for b in ldbfx.branches(gm) if b.eligible]
        ldbfx.set_dropped_branches(gm, branches[: len(branches) // 2])
        result["first_branch_drop_step_s"] = round(_seconds(step), 2)
        result["branch_drop_steady_step_ms"] = round(min(_seconds(step) for _ in range(args.rounds)) * 1000, 2)
    result["unique_graphs"] = dynamo_utils.counters["stats"]["unique_graphs"]
    result["graph_breaks"] = sum(dynamo_utils.counters["graph_break"].values())
    return result


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_all(args) -> dict:
    rows = []
    for variant in ("whole", "blocks", "plain-blocks"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
            command = [sys.executable, __file__, "compile-one", "--variant", variant, *_size(args)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return {"rows": rows}


# -- fsdp ----------------------------------------------------------------------------------------
def fsdp_rank(rank, world, init_file, out_file, args):
    import datetime

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    batch = make_batch(args.batch, args.seq)
    rows = []
    for variant in ("whole graph, root only", "per block + root", "untransformed, per block + root"):
        model = make_model(args.hidden, args.layers)
        total = sum(p.numel() for p in model.parameters())  # before sharding
        peak = [0]

        def unsharded(*_):
            peak[0] = max(peak[0], sum(p.numel() for m in model.modules() for p in m._parameters.values()
                                       if p is not None and not isinstance(p, DTensor)))

        if variant.startswith("whole"):
            gm = ldbfx.transform(model, example_kwargs=batch)
            runner = fully_shard(gm)
            probes = [m for m in gm.modules() if isinstance(m, torch.nn.Linear)]
        else:
            if variant.startswith("per block"):
                per_block(model, batch)
            for layer in model.model.layers:
                fully_shard(layer)
            runner = fully_shard(model)
            probes = list(model.model.layers)
        for m in probes:
            m.register_forward_pre_hook(unsharded)
        # The graph calls no module: its peak is read from the hooked modules' ops' parameters.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (unsharded(), t)[1], lambda t: t):
            loss = runner(**batch).loss
        unsharded()
        loss.backward()
        rows.append({"variant": variant, "peak_unsharded_params": peak[0], "total_params": total})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def fsdp(args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(fsdp_rank, args=(2, os.path.join(tmp, "init"), out, args), nprocs=2)
        with open(out) as f:
            return {"rows": json.load(f)}


# -- step ----------------------------------------------------------------------------------------
def step_time(args) -> dict:
    batch = make_batch(args.batch, args.seq)
    models = {name: make_model(args.hidden, args.layers) for name in ("untransformed", "whole graph", "per block")}
    whole = ldbfx.transform(models["whole graph"], example_kwargs=batch)
    ldbfx.install(models["whole graph"], whole)
    blocks = per_block(models["per block"], batch)
    branches = [b.name for b in ldbfx.branches(whole) if b.eligible]
    quarter = branches[::4]
    names = [f"{m}, {d}" for m in models for d in ("nothing dropped", "a quarter of the branches dropped")
             if not (m == "untransformed" and d != "nothing dropped")]

    def step(name):
        which, drop = name.split(", ")
        gm = {"whole graph": whole, "per block": blocks}.get(which)
        if gm is not None:
            ldbfx.set_dropped_branches(gm, quarter if drop.startswith("a quarter") else [])
        models[which].zero_grad(set_to_none=True)
        models[which](**batch).loss.backward()

    for name in names:  # warm-up
        step(name)
    return {"step_ms": timed(step, args.rounds, names), "dropped_branches": quarter}


def _size(args) -> list[str]:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
            "--seq", str(args.seq), "--rounds", str(args.rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["checkpoint", "compile", "compile-one", "fsdp", "step"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--variant", default="blocks")
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    run = {"checkpoint": checkpoint, "compile": compile_all, "compile-one": compile_one, "fsdp": fsdp,
           "step": step_time}[args.what]
    result = run(args)
    if args.what == "compile-one":
        print(json.dumps(result))
        return
    record = {"what": args.what, "meta": {**run_meta("cpu"), "command": " ".join(sys.argv)},
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "variant")}, **result}
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
