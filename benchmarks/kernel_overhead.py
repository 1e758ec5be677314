"""What does one compiled-path kernel call cost, over the aten work it wraps? (CPU, one thread)

    python benchmarks/kernel_overhead.py --out benchmarks/results/kernel-overhead.json

The compiled backward calls one ldbfx kernel per layer and step (ResNet-50: 53 convolution
kernels and 106 gated norm parameters). Each call pays the dispatcher's trip into Python and the
kernel's own Python (reading the mask, choosing the outputs' strides) on top of the aten work it
runs. Timed here on tiny operands, where that work is negligible, in one process, interleaved,
minimum over rounds:

* ``conv_backward``: ``ldbfx::conv_backward`` (kept layer, dX and dW) vs the same
  ``aten.convolution_backward`` call;
* ``conv_backward_body``: the kernel's Python body called directly (no dispatcher);
* ``masked_grad``: ``ldbfx::masked_grad`` (kept) vs ``clone``, what it runs;
* ``mask_read``: how the kernels read the mask (``LdbState.is_dropped``) vs indexing the tensor;
* ``*_native``: the same kernels with C++ bodies (``ldbfx/ops/native.cpp``), where they build.

The difference per call times the calls per step is the path's fixed cost on a real model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ldbfx
from ldbfx.app.bench import run_meta
from ldbfx.ops import kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=500, help="calls per round and variant")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
    state = gm.ldbfx_state
    mask, index = state.mask, 5  # an eligible layer, kept
    x, grad, weight = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.randn(4, 4, 1, 1)
    conv = (mask, index, [1, 1], [0, 0], [1, 1], 1, True, True, False, True)
    op, body = kernels.KERNELS["library"]["conv_backward"], kernels._conv_backward_impl
    masked = kernels.KERNELS["library"]["masked_grad"]
    aten = torch.ops.aten.convolution_backward.default
    variants = {
        "conv_backward": lambda: op(grad, x, weight, *conv),
        "conv_backward_body": lambda: body(grad, x, weight, *conv),
        "conv_backward_aten": lambda: aten(grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                           [True, True, False]),
        "masked_grad": lambda: masked(grad, mask, index),
        "masked_grad_clone": lambda: grad.clone(),
        "mask_read_indexing": lambda: bool(mask[index]),
    }
    from ldbfx.ops import native

    if native.available():  # the C++ bodies (ldbfx/ops/native.cpp)
        native_conv, native_masked = (kernels.KERNELS["native"][name] for name in ("conv_backward", "masked_grad"))
        variants["conv_backward_native"] = lambda: native_conv(grad, x, weight, *conv)
        variants["masked_grad_native"] = lambda: native_masked(grad, mask, index)
    variants["mask_read"] = lambda: state.is_dropped(mask, index)
    names = list(variants)
    best = dict.fromkeys(names, float("inf"))
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            call = variants[name]
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
    us = {name: round(1e6 * t, 2) for name, t in best.items()}
    overhead = {
        "conv_backward_over_aten_us": round(us["conv_backward"] - us["conv_backward_aten"], 2),
        "conv_backward_body_over_aten_us": round(us["conv_backward_body"] - us["conv_backward_aten"], 2),
        "masked_grad_over_clone_us": round(us["masked_grad"] - us["masked_grad_clone"], 2),
    }
    if "conv_backward_native" in us:
        overhead["conv_backward_native_over_aten_us"] = round(us["conv_backward_native"] - us["conv_backward_aten"], 2)
        overhead["masked_grad_native_over_clone_us"] = round(us["masked_grad_native"] - us["masked_grad_clone"], 2)
    print(json.dumps({"us_per_call": us, **overhead}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": run_meta("cpu") | {"args": vars(args)}, "us_per_call": us, **overhead}, f, indent=1)


if __name__ == "__main__":
    main()
