"""Dropped convolution, eager: three ways to compute its input gradient, against freezing its weight.

* **plain op on the detached weight** (what ships since 2026-12-01): autograd saves the input and
  calls ``convolution_backward`` exactly as for a frozen weight;
* **transposed convolution** of the output gradient, keeping only the weight (shipped before):
  equal to ``convolution_backward``'s dX only on some CPUs' kernels;
* **``convolution_backward`` on an uninitialised stand-in input** (tried on 2026-12-01): exact, and
  keeps no input alive, but slower (fresh memory every step).

Per op (forward + backward of one convolution) and per whole eager step of torchvision models with
every other eligible layer dropped. Interleaved rounds in rotated order, minimum kept (interference
only adds time).

    python benchmarks/conv_input_grad.py --rounds 12 --models resnet18 resnet50 \
        --out benchmarks/results/DATE-cpu-conv-input-grad.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ldbfx.app.bench import run_meta

SHAPES = {  # name: (batch, in, out, size, kernel, stride, groups)
    "3x3 64->64 @28": (8, 64, 64, 28, 3, 1, 1),
    "3x3 s2 128->256 @28": (8, 128, 256, 28, 3, 2, 1),
    "1x1 256->64 @14": (8, 256, 64, 14, 1, 1, 1),
    "3x3 depthwise 128 @28": (8, 128, 128, 28, 3, 1, 128),
    "3x3 grouped g32 256 @14": (8, 256, 256, 14, 3, 1, 32),
}


class _TransposedInputGrad(torch.autograd.Function):
    """The previous eager path: dX as the transposed convolution of the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.conv, ctx.x_size = (stride, padding, dilation, groups), x.shape[2:]
        ctx.geometry = (x.shape, x.stride(), x.dtype)  # for the stand-in variant
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        output_padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k
                          in zip(ctx.x_size, grad.shape[2:], stride, padding, dilation, weight.shape[2:])]
        grad_x = F.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)
        return grad_x, None, None, None, None, None


class _StandInInputGrad(_TransposedInputGrad):
    """dX by ``convolution_backward`` on an uninitialised input with the input's geometry."""

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        shape, strides, dtype = ctx.geometry
        stand_in = torch.empty_strided(shape, strides, dtype=dtype, requires_grad=True)
        grad_x = torch.ops.aten.convolution_backward(grad, stand_in, weight, None, stride, padding, dilation,
                                                     False, [0] * len(stride), groups, [True, False, False])[0]
        return grad_x, None, None, None, None, None


ALTERNATIVES = {"transposed dX (before)": _TransposedInputGrad, "stand-in dX (tried)": _StandInInputGrad}


def variants(x, w, stride, groups):
    pad, dil = (w.shape[-1] // 2,) * 2, (1, 1)

    def frozen():
        xi = x.detach().requires_grad_()
        F.conv2d(xi, w.detach(), None, stride, pad, dil, groups).sum().backward()
        return xi.grad

    def alternative(fn):
        def run():
            xi = x.detach().requires_grad_()
            fn.apply(xi, w.detach(), stride, pad, dil, groups).sum().backward()
            return xi.grad
        return run

    return {"frozen = plain op (shipped)": frozen, **{k: alternative(f) for k, f in ALTERNATIVES.items()}}


def model_rows(names, rounds, resolution=64, batch=16):
    """Whole eager steps (every other eligible layer dropped) with each dX implementation, and
    freezing the same layers, interleaved in one process."""
    import torchvision

    import ldbfx
    from ldbfx.ops import convs

    shipped = convs._dropped_conv
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name)
        gm = ldbfx.transform(model)
        x = torch.randn(batch, 3, resolution, resolution)
        drop = [l for i, l in enumerate(l for l in ldbfx.layers(gm) if l.eligible) if i % 2 == 0]
        frozen = [p for n, p in model.named_parameters() if n in {q for l in drop for q in l.params}]

        def ldb_step(dropped_conv):
            def step():
                convs._dropped_conv = dropped_conv
                ldbfx.set_dropped(gm, drop)
                model.zero_grad(set_to_none=True)
                gm(x).square().mean().backward()
            return step

        def via(fn):
            def dropped_conv(x, weight, bias, stride, padding, dilation, groups):
                if not x.requires_grad or bias is not None:
                    return shipped(x, weight, bias, stride, padding, dilation, groups)
                return fn.apply(x, weight.detach(), stride, padding, dilation, groups)
            return dropped_conv

        def frozen_step():
            for p in frozen:
                p.requires_grad_(False)
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            for p in frozen:
                p.requires_grad_(True)

        fns = {"frozen": frozen_step, "ldbfx, plain op (shipped)": ldb_step(shipped),
               **{f"ldbfx, {k}": ldb_step(via(f)) for k, f in ALTERNATIVES.items()}}
        try:
            best = _best_of(fns, rounds, steps=2)
        finally:
            convs._dropped_conv = shipped
        rows.append({"model": name, "resolution": resolution, "batch": batch, "ms": best})
        print(f"{name} @ {resolution} px, batch {batch}: " + "  ".join(f"{k} {v:6.1f} ms" for k, v in best.items()),
              flush=True)
    return rows


def _best_of(fns, rounds, steps):
    """Minimum time per call (ms) over ``rounds`` rounds in rotated order."""
    best = {label: float("inf") for label in fns}
    labels = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            start = time.perf_counter()
            for _ in range(steps):
                fns[label]()
            best[label] = min(best[label], (time.perf_counter() - start) / steps * 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50"],
                        help="torchvision models for the whole-step comparison")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name, (n, cin, cout, size, k, s, g) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(n, cin, size, size)
        w = torch.randn(cout, cin // g, k, k, requires_grad=True)
        fns = variants(x, w, (s, s), g)
        ref = fns["frozen = plain op (shipped)"]()
        equal = {label: bool(torch.equal(fn(), ref)) for label, fn in fns.items()}
        best = _best_of(fns, args.rounds, args.steps)
        row = {"shape": name, "ms": best, "bitwise_equal_to_frozen": equal}
        rows.append(row)
        print(f"{name:26s} " + "  ".join(f"{k} {v:7.2f} ms{'' if equal[k] else ' (differs)'}"
                                          for k, v in best.items()), flush=True)
    models = model_rows(args.models, args.rounds) if args.models else []
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": run_meta("cpu"), "rows": rows, "model_rows": models}, f, indent=1)


if __name__ == "__main__":
    main()
