"""Does freezing some layers change the *other* gradients, against a full backward?

docs/how-it-works.md ("What exact means") says a full backward is not a bitwise reference for
ldbfx (nor for freezing): when a convolution's weight needs no gradient, autograd may choose
another convolution-backward kernel for its input gradient, which sums in another order. This
measures that difference on this CPU: each model's gradients of the parameters that keep training
(the first four layers and the last), with every eligible layer frozen (``requires_grad=False``)
against a full backward of the same model, same input, same weights (dropout seeded). It prints
one line per model; the docs quote the output kept in benchmarks/results/.

    python benchmarks/freeze_vs_full.py --threads 2 resnet18 resnext50_32x4d regnet_x_400mf \
        mobilenet_v3_small efficientnet_b0 convnext_tiny   # torchvision names
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import ldbfx

MODELS = ("resnet18", "resnext50_32x4d", "regnet_x_400mf", "mobilenet_v3_small")


def grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both backward passes
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main(names: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} thread(s), input 2x3x64x64, every eligible layer frozen")
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().train()
        x = torch.randn(2, 3, 64, 64)
        frozen = {p for layer in ldbfx.layers(ldbfx.transform(model)) if layer.eligible for p in layer.params}
        full = grads(model, x)
        named = dict(model.named_parameters())
        for p in frozen:
            named[p].requires_grad_(False)
        partial = grads(model, x)
        worst_abs, worst_rel, where = 0.0, 0.0, ""
        for n, g in partial.items():
            diff = (g - full[n]).abs().max().item()
            rel = diff / max(full[n].abs().max().item(), 1e-30)
            if diff > worst_abs:
                worst_abs, worst_rel, where = diff, rel, n
        bitwise = all(torch.equal(g, full[n]) for n, g in partial.items())
        print(f"{name}: {len(frozen)} frozen, {len(partial)} trained; bitwise equal: {bitwise}; "
              f"largest difference {worst_abs:.2e} absolute ({worst_rel:.2e} of that tensor's largest "
              f"entry){f' in {where}' if where else ''}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    main(options.models, options.threads)
