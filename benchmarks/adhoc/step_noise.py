"""One-off (issue 13, ninth pass): is the CPU step-time noise scheduling, or the CPU itself?

Times 40 steps of the compiled, untransformed ResNet-50 (64 px, batch 16, one thread) by wall
clock and by the thread's own CPU time (``time.thread_time``), with the thread's minor page
faults and context switches (``getrusage(RUSAGE_THREAD)``). If the two clocks agree while the
steps swing, the process was not descheduled: the same work simply ran slower (shared caches,
memory bandwidth, the host), and no clock or pinning inside the VM removes that.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
        MALLOC_TOP_PAD_=1073741824 python benchmarks/adhoc/step_noise.py
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
import torch.nn.functional as F

from ldbfx.bench import make_model


def main(steps: int = 40) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model("resnet50", 64)
    compiled = torch.compile(model)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 1000, (16,))

    def step() -> None:
        F.cross_entropy(compiled(x), y).backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(3):
        step()
    rows = []
    for _ in range(steps):
        r0, w0, c0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter(), time.thread_time()
        step()
        w1, c1, r1 = time.perf_counter(), time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
        rows.append((1e3 * (w1 - w0), 1e3 * (c1 - c0), r1.ru_minflt - r0.ru_minflt,
                     r1.ru_nivcsw - r0.ru_nivcsw, r1.ru_nvcsw - r0.ru_nvcsw))
    for row in rows:
        print("wall %.1f ms  cpu %.1f ms  minor faults %d  involuntary switches %d  voluntary %d" % row)
    wall, cpu = [r[0] for r in rows], [r[1] for r in rows]
    print("wall min %.1f median %.1f max %.1f | cpu min %.1f median %.1f max %.1f | largest wall-cpu %.1f ms"
          % (min(wall), statistics.median(wall), max(wall), min(cpu), statistics.median(cpu), max(cpu),
             max(w - c for w, c in zip(wall, cpu))))


if __name__ == "__main__":
    main()
