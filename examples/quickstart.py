"""ldbfx in one minute: transform a torchvision ResNet-18, drop random layers' weight gradients,
and measure with FlopCounterMode what that really saves. Runs on CPU in well under a minute.

    python examples/quickstart.py
"""

import random
import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import ldbfx


def backward_flops(gm, x, y):
    loss = torch.nn.functional.cross_entropy(gm(x), y)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def main():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm = ldbfx.transform(model)  # trace once, rewrite once
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    ldbfx.summary(gm, x[:2], print_fn=lambda table: print("\n".join(table.splitlines()[:8] + ["..."] + table.splitlines()[-2:])))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    eligible = [layer.name for layer in ldbfx.layers(gm) if layer.eligible]
    rng = random.Random(0)
    print("\nstep  dropped  loss    backward GFLOP")
    for step in range(6):
        dropped = [name for name in eligible if rng.random() < 0.5] if step % 2 else []
        ldbfx.set_dropped(gm, dropped)  # a new mask every step: no retrace, no recompile
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(gm(x), y)
        start = time.perf_counter()
        loss.backward()
        optimizer.step()  # dropped layers: parameters and momentum untouched
        flops = backward_flops(gm, x, y)
        optimizer.zero_grad()
        print(f"{step:>4}  {len(dropped):>7}  {loss.item():.3f}  {flops / 1e9:.2f}"
              f"   ({1e3 * (time.perf_counter() - start):.0f} ms)")
    ldbfx.set_dropped(gm, [])
    print("\nstate_dict keys equal the original's:", list(gm.state_dict()) == list(model.state_dict()))


if __name__ == "__main__":
    main()
