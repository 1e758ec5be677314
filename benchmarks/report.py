"""Turns benchmark JSON (``--out`` of bench_core.py / ``ldbfx bench``) into markdown tables.

    python benchmarks/report.py cpu_resnet50.json cpu_vit.json >> docs/benchmarks.md
"""

import json
import sys


def table(path: str) -> str:
    data = json.load(open(path))
    meta, rows = data["meta"], data["rows"]
    args = meta["args"]
    out = [f"**{', '.join(args['models'])}** — {meta['date']}, torch {meta['torch']}, device "
           f"{meta['device_name']} ({meta['threads']} threads), batch {args['batch']}, "
           f"{args['resolution']} px, amp {args['amp'] or 'fp32'}, {args['rounds']} paired rounds of "
           f"{args['steps']} steps", ""]
    compiled = "compiled_baseline" in rows[0]
    head = ["model", "dropped", "dW share", "bwd GFLOP base / ideal / ldbfx", "saved MB base / ideal / ldbfx",
            "eager s/step base", "eager saved: ideal / ldbfx / mask-after"]
    if compiled:
        head += ["compiled s/step base", "compiled saved: ideal / ldbfx"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(r, key):
        lo, hi = r[f"{key}_saving_range"]
        return f"{100 * r[f'{key}_saving']:+.1f}% [{100 * lo:+.0f}, {100 * hi:+.0f}]"

    for r in rows:
        cells = [
            r["model"], f"{r['fraction']:.0%} ({r['layers_dropped']} layers)", f"{100 * r['dW_share_dropped']:.1f}%",
            " / ".join(f"{r[k] / 1e9:.1f}" for k in ("flops_baseline", "flops_ideal", "flops_ldbfx")),
            " / ".join(f"{r[k] / 1e6:.0f}" for k in ("saved_baseline", "saved_ideal", "saved_ldbfx")),
            f"{r['eager_baseline']:.3f}",
            " / ".join(pct(r, f"eager_{m}") for m in ("ideal", "ldbfx", "mask_after")),
        ]
        if compiled:
            cells += [f"{r['compiled_baseline']:.3f}",
                      " / ".join(pct(r, f"compiled_{m}") for m in ("ideal", "ldbfx"))]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Target checks:", ""] + [f"- {c}" for c in data["checks"]]
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
