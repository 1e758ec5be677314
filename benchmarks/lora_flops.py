"""Under LoRA, what each method saves: training FLOPs of one step (forward + backward).

    python benchmarks/lora_flops.py --out benchmarks/results/2026-12-06-cpu-lora-flops.json

A random-init Hugging Face decoder (Llama and Qwen2 shapes: 8 layers, hidden 256, MLP 688,
sequence 256, batch 4) with LoRA r=8 on every projection, captured by ``ldbfx.transform`` from a
batch. FLOPs counted by ``FlopCounterMode`` (exact: no timing, so no machine noise) for:

* ``baseline``: nothing dropped;
* ``ldb_all``: LayerDropBack's ceiling, every eligible layer's weight gradient skipped;
* ``branches_half`` / ``branches_all``: half (a seeded random half) / all of the eligible
  attention and MLP branches dropped (DropBP; its uniform rate 0.5 saves ``branches_all / 2`` on
  average);
* ``detached_half``: the reference for ``branches_half``, the same blocks' outputs detached by
  forward hooks on the untransformed model (exported, so both sides run the same ATen ops).
"""

from __future__ import annotations

import argparse
import copy
import json
import random

import peft
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import ldbfx
from ldbfx.app.bench import run_meta

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run().backward()
    return counter.get_total_flops()


def measure(family: str, args) -> dict:
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                                peft.LoraConfig(r=args.rank, target_modules=TARGETS, lora_dropout=0.0))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    gm = ldbfx.transform(model, example_kwargs=batch)
    branches = [b.name for b in ldbfx.branches(gm) if b.eligible]
    half = sorted(random.Random(0).sample(branches, len(branches) // 2), key=branches.index)
    loss = lambda: gm(**batch).loss  # noqa: E731
    result = {"family": family, "branches": len(ldbfx.branches(gm)), "eligible_branches": len(branches),
              "dropped_half": half,
              "baseline": step_flops(loss)}
    ldbfx.set_dropped(gm, [layer.name for layer in ldbfx.layers(gm) if layer.eligible])
    result["ldb_all"] = step_flops(loss)
    ldbfx.set_dropped(gm, [])
    ldbfx.set_dropped_branches(gm, half)
    result["branches_half"] = step_flops(loss)
    ldbfx.set_dropped_branches(gm, branches)
    result["branches_all"] = step_flops(loss)
    ldbfx.set_dropped_branches(gm, [])
    reference = copy.deepcopy(model)
    reference.config.use_cache = False
    for name in half:
        reference.get_submodule(name).register_forward_hook(
            lambda m, i, out: (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach())
    exported = torch.export.export(reference, (), batch, strict=False).module()
    result["detached_half"] = step_flops(lambda: exported(**batch).loss)
    for key in ("ldb_all", "branches_half", "branches_all", "detached_half"):
        result[f"{key}_saving"] = round(1 - result[key] / result["baseline"], 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["llama", "qwen2"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [measure(family, args) for family in args.families]
    for row in rows:
        print(f"{row['family']}: {row['eligible_branches']} of {row['branches']} branches eligible; saving vs "
              f"baseline: LDB (every eligible layer) {row['ldb_all_saving']:.1%}, half the branches "
              f"{row['branches_half_saving']:.1%} (detached reference {row['detached_half_saving']:.1%}), "
              f"every eligible branch {row['branches_all_saving']:.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": run_meta("cpu"), "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
