"""One-off (issue 13, ninth pass): what each compiled variant keeps for its backward.

By per-round medians the gap between ldbfx and freezing grows with the activations (ResNet-50:
~7 ms per step at 64 px, ~34 ms at 128 px), which per-call costs do not. One difference that
scales so: freezing saves no input for a frozen convolution's dW, while ldbfx's graph, compiled
once for any mask, saves every eligible layer's input in case it is kept. This counts the
tensors (and their bytes, each storage once) that the compiled forward hands autograd to keep,
through ``torch.autograd.graph.saved_tensors_hooks``, for the variants of
``benchmarks/compiled_path.py`` (the same seeded 30% of layers dropped).

    python benchmarks/adhoc/saved_bytes.py [resolution ...]
"""

from __future__ import annotations

import random
import sys

import torch
import torch.nn.functional as F

import ldbfx
from ldbfx.bench import make_model


def saved(module, x) -> tuple[int, int]:
    storages: dict[int, int] = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(module(x), torch.zeros(x.shape[0], dtype=torch.long))
    loss.backward()
    return count, sum(storages.values())


def main(resolutions: list[int]) -> None:
    torch.set_num_threads(1)
    for resolution in resolutions:
        torch.manual_seed(0)
        model = make_model("resnet50", resolution)
        named = dict(model.named_parameters())
        x = torch.randn(16, 3, resolution, resolution)
        gm = ldbfx.transform(model)
        eligible = [layer for layer in ldbfx.layers(gm) if layer.eligible]
        order = list(range(len(eligible)))
        random.Random(0).shuffle(order)
        drop = [eligible[i] for i in sorted(order[: round(0.3 * len(eligible))])]
        frozen = [named[p] for layer in drop for p in layer.params]
        base, transformed = torch.compile(model), torch.compile(gm)
        rows = {}
        for _ in range(2):  # the first pass compiles
            rows["baseline"] = saved(base, x)
            for p in frozen:
                p.requires_grad_(False)
            rows["ideal"] = saved(base, x)
            for p in frozen:
                p.requires_grad_(True)
            ldbfx.set_dropped(gm, [])
            rows["ldbfx0"] = saved(transformed, x)
            ldbfx.set_dropped(gm, drop)
            rows["ldbfx"] = saved(transformed, x)
            ldbfx.set_dropped(gm, [])
        for name, (count, nbytes) in rows.items():
            print(f"resnet50 {resolution} px, batch 16, {name:8s}: {count:4d} saved tensors, "
                  f"{nbytes / 2**20:8.1f} MiB of storage")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64])
