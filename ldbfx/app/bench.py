"""Core benchmark: what skipping weight gradients really saves, against the alternatives.

For each model and each drop fraction of the eligible layers (the same random subset for every
method) it measures, side by side in one run:

* ``baseline``: the untransformed model, full backprop;
* ``ideal``: the same layers frozen by toggling ``requires_grad`` (eager; compiled with one compile
  per fixed mask, which is why it is not usable for training: a new mask every step recompiles);
* ``mask_after``: a full backward, then the dropped gradients discarded (what published
  ChannelDropBack code does): costs the full backward;
* ``ldbfx``: ``ldbfx.transform`` + ``set_dropped`` (eager; compiled once for all masks).

Metrics: backward FLOPs (``FlopCounterMode``), eager and compiled step time (zero_grad + forward +
backward, median of ``--steps`` after warm-up), bytes of tensors saved for backward.

Targets checked at the end (from the core issue): FLOP saving equal to ``ideal``; eager time saving
>= 95% of ``ideal``'s; compiled >= 90%; overhead with nothing dropped <= 3% eager, <= 5% compiled.

Usage::

    python benchmarks/bench_core.py --models resnet50 vit_b_16 --device cpu --out results.json
    ldbfx bench resnet50 --device cuda --amp bf16 --resolution 224 --batch 64
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldbfx

from .train import _sync

__all__ = ["add_arguments", "run", "main", "run_meta", "make_model"]


def run_meta(device: str) -> dict:
    """Where and when a benchmark ran: date, torch version, machine, CPU model, threads, device name."""
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "cpu": _cpu_name(),
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}


def _cpu_name() -> str | None:
    """The CPU's model name (Linux), which ``platform`` does not give: timings differ by CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def make_model(name: str, resolution: int) -> torch.nn.Module:
    import torchvision

    from .train import build_model

    if name.startswith("vit_") and name in torchvision.models.list_models():
        # torchvision's ViTs fix the token count at construction: image_size=resolution keeps the
        # layer widths (ViT-B/16 at 224 px has 197 tokens).
        return torchvision.models.get_model(name, image_size=resolution)
    return build_model(name, 1000)


def seeded_drop(gm, fraction: float) -> list:
    """The eligible layers every benchmark drops at ``fraction``: the first ``fraction`` of one
    fixed shuffle (seed 0), in graph order. A larger fraction drops a superset, and the ideal
    freezes exactly these layers.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(8))))
        >>> len(seeded_drop(gm, 0.5))
        2
    """
    eligible = [layer for layer in ldbfx.layers(gm) if layer.eligible]
    order = list(range(len(eligible)))
    random.Random(0).shuffle(order)
    return [eligible[i] for i in sorted(order[: round(fraction * len(eligible))])]


class Runner:
    def __init__(self, module, x, y, device, amp):
        self.module, self.x, self.y, self.device = module, x, y, device
        self.amp = amp

    def autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.amp)  # 'cuda:1' -> 'cuda'

    def loss(self):
        with self.autocast():
            out = self.module(self.x)
        return torch.nn.functional.cross_entropy(out.float(), self.y)

    def step(self, params, after_backward=None):
        for p in params:
            p.grad = None
        self.loss().backward()
        if after_backward is not None:
            after_backward()

    def time_steps(self, params, steps, warmup, after_backward=None) -> float:
        for _ in range(warmup):
            self.step(params, after_backward)
        times = []
        for _ in range(steps):
            _sync(self.device)
            start = time.perf_counter()
            self.step(params, after_backward)
            _sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def backward_flops(self, params) -> int:
        for p in params:
            p.grad = None
        loss = self.loss()
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return counter.get_total_flops()

    def saved_bytes(self) -> int:
        """Bytes of the distinct storages saved for backward, parameters' own storage excluded."""
        seen = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        total = 0

        def pack(t):
            nonlocal total
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        del loss
        return total


def bench_model(name, args, fractions):
    """Yields one row per fraction of ``name``'s eligible layers dropped, as each is measured."""
    device = args.device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    torch.manual_seed(0)
    model = make_model(name, args.resolution).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    gm = ldbfx.transform(model)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    params = list(model.parameters())
    named = dict(model.named_parameters())
    base, ours = Runner(model, x, y, device, amp), Runner(gm, x, y, device, amp)
    report = ldbfx.inspect.weight_grad_flops(gm, x)

    compiled_base = compiled_ours = None
    # The ideal compiles once more for each fraction it is timed at (its frozen set is a guard).
    compiled_fractions = fractions if args.compiled_fractions is None else args.compiled_fractions
    if args.compile:
        # Compiled once each; the ideal's frozen sets add one guarded cache entry per mask.
        torch._dynamo.reset()
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        compiled_base = Runner(torch.compile(model), x, y, device, amp)
        compiled_ours = Runner(torch.compile(gm), x, y, device, amp)

    for fraction in fractions:
        drop = seeded_drop(gm, fraction)
        drop_params = [named[p] for l in drop for p in l.params]
        row = {"model": name, "fraction": fraction, "layers_dropped": len(drop),
               "dW_share_dropped": sum(report.weight_grad[l.index] for l in drop) / report.backward}

        def freeze(flag):
            for p in drop_params:
                p.requires_grad_(not flag)

        def discard():
            for p in drop_params:
                p.grad = None

        # FLOPs
        row["flops_baseline"] = base.backward_flops(params)
        freeze(True)
        row["flops_ideal"] = base.backward_flops(params)
        freeze(False)
        ldbfx.set_dropped(gm, drop)
        row["flops_ldbfx"] = ours.backward_flops(params)
        row["flops_mask_after"] = row["flops_baseline"]  # a full backward, by construction
        # saved activations
        ldbfx.set_dropped(gm, [])
        row["saved_baseline"] = base.saved_bytes()
        freeze(True)
        row["saved_ideal"] = base.saved_bytes()
        freeze(False)
        ldbfx.set_dropped(gm, drop)
        row["saved_ldbfx"] = ours.saved_bytes()
        # Timing: each round measures every method back to back, in an order rotated per round;
        # savings are paired with the same round's baseline, then the median over rounds is kept.
        def as_ideal():
            freeze(True)
            return lambda: freeze(False)

        def as_ldbfx():
            ldbfx.set_dropped(gm, drop)
            return lambda: ldbfx.set_dropped(gm, [])

        def plain():
            return lambda: None

        eager = {"baseline": (base, plain, None), "ideal": (base, as_ideal, None),
                 "mask_after": (base, plain, discard), "ldbfx": (ours, as_ldbfx, None)}
        row.update(_timed("eager", eager, params, args))
        if args.compile and fraction in compiled_fractions:
            # ideal: requires_grad guards give each fixed mask its own compile of the baseline;
            # ldbfx: the same compiled graph for every mask.
            compiled = {"baseline": (compiled_base, plain, None), "ideal": (compiled_base, as_ideal, None),
                        "ldbfx": (compiled_ours, as_ldbfx, None)}
            row.update(_timed("compiled", compiled, params, args))
        print(json.dumps(row), flush=True)
        yield row
    if args.compile:
        row_compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"{name}: {row_compiles} graphs compiled in total (ldbfx: 1 for all masks)", flush=True)


def _timed(prefix: str, methods: dict, params, args) -> dict[str, float]:
    """Median step time per method and median paired saving vs the baseline (with its range)."""
    names = list(methods)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            runner, setup, after = methods[n]
            undo = setup()
            times[n].append(runner.time_steps(params, args.steps, args.warmup, after))
            undo()
    out = {f"{prefix}_{n}": statistics.median(t) for n, t in times.items()}
    for n in names[1:]:
        savings = [1 - t / b for t, b in zip(times[n], times["baseline"])]
        out[f"{prefix}_{n}_saving"] = statistics.median(savings)
        out[f"{prefix}_{n}_saving_range"] = [min(savings), max(savings)]
    return out


def check_targets(rows) -> list[str]:
    lines = []
    for r in rows:
        tag = f"{r['model']} @ {r['fraction']:.1f}"
        saved_ideal = r["flops_baseline"] - r["flops_ideal"]
        saved_ours = r["flops_baseline"] - r["flops_ldbfx"]
        ok = abs(saved_ours - saved_ideal) <= 0.01 * max(saved_ideal, 1) + 1
        lines.append(f"{tag}: FLOPs saved {saved_ours / 1e9:.2f} vs ideal {saved_ideal / 1e9:.2f} G "
                     f"{'PASS' if ok else 'FAIL'}")
        for mode, need in (("eager", 0.95), ("compiled", 0.90)):
            if f"{mode}_ldbfx_saving" not in r:  # not timed compiled at this fraction
                continue
            ours, ideal = r[f"{mode}_ldbfx_saving"], r[f"{mode}_ideal_saving"]
            lo, hi = r[f"{mode}_ldbfx_saving_range"]
            if r["fraction"] == 0:
                limit = 0.03 if mode == "eager" else 0.05
                lines.append(f"{tag}: {mode} overhead {-100 * ours:+.1f}% (rounds {-100 * hi:+.1f}.."
                             f"{-100 * lo:+.1f}%; limit {100 * limit:.0f}%) {'PASS' if -ours <= limit else 'FAIL'}")
            else:
                ratio = ours / ideal if ideal > 0 else float("nan")
                lines.append(f"{tag}: {mode} time saved {100 * ours:.1f}% (rounds {100 * lo:.1f}..{100 * hi:.1f}) "
                             f"vs ideal {100 * ideal:.1f}% -> {100 * ratio:.0f}% of ideal (need "
                             f"{100 * need:.0f}%) {'PASS' if ratio >= need else 'FAIL'}")
    return lines


def add_arguments(parser: argparse.ArgumentParser, models_positional: bool = True) -> None:
    if models_positional:
        parser.add_argument("models", nargs="+", help="torchvision or timm model names, e.g. resnet50 vit_b_16")
    else:
        parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"], help="model names")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.3, 0.5, 1.0],
                        help="fractions of the eligible layers to drop (the same random subset for every method)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    parser.add_argument("--resolution", type=int, default=224, help="input resolution")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (best kept)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled measurements")
    parser.add_argument("--compiled-fractions", nargs="+", type=float, default=None,
                        help="time the compiled variants at these of --fractions only (default: all); each "
                             "fraction costs the ideal one more compile")
    parser.add_argument("--out", default=None, help="write the rows and the target checks as JSON")


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of arguments argparse cannot check alone, or ``None``."""
    outside = sorted({f for f in (*args.fractions, *(args.compiled_fractions or ())) if not 0.0 <= f <= 1.0})
    if outside:
        return f"fractions must lie in [0, 1], got {outside}"
    unknown = sorted(set(args.compiled_fractions or ()) - set(args.fractions))
    if unknown:
        return f"--compiled-fractions {unknown} are not among --fractions {args.fractions}"
    if args.compiled_fractions and not args.compile:
        return "--compiled-fractions needs the compiled measurements (drop --no-compile)"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, models_positional=False)
    run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> list[dict]:
    problem = argument_problem(args)
    if problem:
        raise ValueError(problem)
    rows = []

    def save(checks: list[str]) -> None:
        if args.out:
            meta = run_meta(args.device)
            meta["args"] = {k: v for k, v in vars(args).items() if not callable(v)}  # not the CLI handler
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows, "checks": checks}, f, indent=1)

    for name in args.models:
        for row in bench_model(name, args, args.fractions):
            rows.append(row)
            save([])  # after every row, so a run cut short keeps what it measured
    checks = check_targets(rows)
    print("\n".join(checks))
    save(checks)
    return rows


if __name__ == "__main__":
    main()
