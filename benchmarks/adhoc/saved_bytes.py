"""One-off (issue 13, ninth pass): what each compiled variant keeps for its backward.

By per-round medians the gap between ldbfx and freezing grows with the activations (ResNet-50:
~7 ms per step at 64 px, ~34 ms at 128 px), which per-call costs do not. One difference that
scales so: freezing saves no input for a frozen convolution's dW, while ldbfx's graph, compiled
once for any mask, saves every eligible layer's input in case it is kept. This counts the bytes
that the compiled forward hands autograd to keep (``ldbfx.bench.Runner.saved_bytes``: each
storage once, the parameters' own excluded), for the variants of ``benchmarks/compiled_path.py``
(the same seeded 30% of layers dropped).

    python benchmarks/adhoc/saved_bytes.py [resolution ...]
"""

from __future__ import annotations

import sys

import torch

import ldbfx
from ldbfx.bench import Runner, make_model, seeded_drop


def main(resolutions: list[int]) -> None:
    torch.set_num_threads(1)
    for resolution in resolutions:
        torch.manual_seed(0)
        model = make_model("resnet50", resolution)
        named = dict(model.named_parameters())
        x = torch.randn(16, 3, resolution, resolution)
        y = torch.randint(0, 1000, (16,))
        gm = ldbfx.transform(model)
        drop = seeded_drop(gm, 0.3)
        frozen = [named[p] for layer in drop for p in layer.params]
        base = Runner(torch.compile(model), x, y, "cpu", None)
        transformed = Runner(torch.compile(gm), x, y, "cpu", None)
        rows = {}
        for _ in range(2):  # the first pass compiles
            rows["baseline"] = base.saved_bytes()
            for p in frozen:
                p.requires_grad_(False)
            rows["ideal"] = base.saved_bytes()
            for p in frozen:
                p.requires_grad_(True)
            ldbfx.set_dropped(gm, [])
            rows["ldbfx0"] = transformed.saved_bytes()
            ldbfx.set_dropped(gm, drop)
            rows["ldbfx"] = transformed.saved_bytes()
            ldbfx.set_dropped(gm, [])
        for name, nbytes in rows.items():
            print(f"resnet50 {resolution} px, batch 16, {name:8s}: {nbytes / 2**20:8.1f} MiB kept for the backward")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64])
