"""One-off (issue 13, ninth pass): could a dropped layer's zero dW cost nothing on the CPU?

The compiled path must return a tensor for every parameter's gradient, so a dropped layer's dW is
allocated and zero-filled each step (zero_fill.py: ~2 ms per ResNet-50 step for the 31 layers
``benchmarks/compiled_path.py`` drops). Anonymous ``mmap`` memory is zero by the OS's promise
and costs nothing until touched, and in the common loop nothing touches a dropped dW: the
optimizer hook sets it to ``None``. But a ``clip_grad_norm_`` or a DDP bucket copy reads it.
This times, for the same 31 layers' dW (minimum over rounds, one thread), per step:

* ``filled``: ``empty_strided(...).zero_()``, what the kernels do;
* ``mapped``: anonymous mmap pages (``torch.frombuffer(mmap.mmap(-1, n))``) for tensors of
  1 MiB or more, filled ones below;

each allocated and freed (``alloc+free``), and allocated, read once (``abs().max()``, as a
norm would) and freed (``alloc+read+free``).

    python benchmarks/adhoc/zero_pages.py
"""

from __future__ import annotations

import mmap
import time

import torch

import ldbfx
from ldbfx.bench import make_model, seeded_drop


def dropped_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = make_model("resnet50", 64)
    named = dict(model.named_parameters())
    return [named[p] for layer in seeded_drop(ldbfx.transform(model), 0.3) for p in layer.params]


def main() -> None:
    torch.set_num_threads(1)
    params = dropped_params()
    print(len(params), "tensors", sum(p.numel() for p in params) * 4 / 1e6, "MB")

    def filled() -> list[torch.Tensor]:
        return [torch.empty_strided(p.shape, p.stride()).zero_() for p in params]

    def mapped() -> list[torch.Tensor]:
        out = []
        for p in params:
            n = p.numel() * p.element_size()
            if n >= 1 << 20:
                out.append(torch.frombuffer(mmap.mmap(-1, n), dtype=p.dtype).view(p.shape))
            else:
                out.append(torch.empty_strided(p.shape, p.stride()).zero_())
        return out

    def read(ts: list[torch.Tensor]) -> float:
        return sum(float(t.abs().max()) for t in ts)

    best: dict[tuple[str, str], float] = {}
    for _ in range(5):
        for name, make in (("filled", filled), ("mapped", mapped)):
            for what in ("alloc+free", "alloc+read+free"):
                for _ in range(10):
                    t = time.perf_counter()
                    ts = make()
                    if what == "alloc+read+free":
                        assert read(ts) == 0.0
                    del ts
                    key = (name, what)
                    best[key] = min(best.get(key, float("inf")), time.perf_counter() - t)
    for (name, what), s in best.items():
        print(f"{name:7s} {what:16s} min {1e3 * s:6.2f} ms per step")


if __name__ == "__main__":
    main()
