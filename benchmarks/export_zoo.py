"""Which FX zoo models also capture through the torch.export front end, and with what savings.

For every model of tests/models.py's ZOO: transform with torch.fx and with torch.export (an
example batch), then compare the two captures: eval outputs bitwise equal to the model, and the
share of the backward FLOPs that dropping every eligible layer skips. Informs docs/design.md's
"two front ends" decision.

    python benchmarks/export_zoo.py --out benchmarks/results/2026-12-01-cpu-export-zoo.json
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import ldbfx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from contract import backward_flops, loss_of  # noqa: E402
from models import ZOO  # noqa: E402


def dropped_share(gm, x):
    full = backward_flops(lambda: loss_of(gm(x)))
    ldbfx.set_dropped(gm, [l for l in ldbfx.layers(gm) if l.eligible])
    try:
        dropped = backward_flops(lambda: loss_of(gm(x)))
    finally:
        ldbfx.set_dropped(gm, [])
    return 1 - dropped / full


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, (make, make_input) in ZOO.items():
        torch.manual_seed(0)
        model, x = make(), make_input()
        row = {"model": name}
        for front, kwargs in (("fx", {}), ("export", {"example_args": (x,)})):
            start = time.perf_counter()
            try:
                gm = ldbfx.transform(model, **kwargs)
                model.eval(), gm.eval()
                with torch.no_grad():
                    equal = torch.equal(model(x), gm(x))
                model.train(), gm.train()
                row[front] = {"ok": True, "eval_equal": equal, "layers": len(ldbfx.layers(gm)),
                              "saves_compute": sum(l.saves_compute for l in ldbfx.layers(gm)),
                              "dropped_share": round(dropped_share(gm, x), 4),
                              "seconds": round(time.perf_counter() - start, 1)}
            except Exception as e:  # a capture failure is a result here
                row[front] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rows.append(row)
        fx, ex = row["fx"], row["export"]
        print(name, "fx", fx.get("dropped_share", fx.get("error")), "| export",
              ex.get("dropped_share", ex.get("error")), ex.get("eval_equal"), flush=True)
    ok = [r for r in rows if r["export"]["ok"]]
    print(f"export captures {len(ok)} of {len(rows)}; eval-equal {sum(r['export']['eval_equal'] for r in ok)}")
    if args.out:
        from ldbfx.app.bench import run_meta

        with open(args.out, "w") as f:
            json.dump({"meta": {**run_meta("cpu"), "command": "python benchmarks/export_zoo.py"}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
