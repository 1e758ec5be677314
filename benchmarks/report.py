"""Turns benchmark JSON into the markdown tables of docs/benchmarks.md.

Reads the ``--out`` of bench_core.py / ``ldbfx bench``, ldb_speedup.py, bench_policies.py and
ddp_comm.py (the kind is recognised from the rows), or a ``.jsonl`` of several such runs, one per
line (how benchmarks/results/ keeps a question's runs on one machine):

    python benchmarks/report.py cpu_resnet50.json cpu_vit.json
    python benchmarks/report.py benchmarks/results/2026-11-21-cpu-core.jsonl
"""

import json
import sys


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def speedup_table(data: dict) -> str:
    """ldb_speedup.py: per-sample times at kappa = 1 and 2, eager and compiled, and the FLOP bound."""
    out = []
    for r in data["rows"]:
        out += [(f"**{r['model']}**: a DROP step costs {100 * r['drop_step_flops_ratio']:.1f}% of a full step's "
                 f"FLOPs, so skipping dW alone can give at most {_pct(r['flop_bound_speedup'])} over a run "
                 "(half the epochs DROP)."), "",
                ("| mode | ms/sample full B | full κB | ldbfx, nothing dropped, B | DROP κ=1 | DROP κ=2 "
                 "| DROP step vs full, κ=1 / κ=2 | run speed-up κ=1 / κ=2 [κ=2 range] |"),
                "|---|---|---|---|---|---|---|---|"]
        for mode in ("eager", "compiled"):
            if mode not in r:
                continue
            e, lo_hi = r[mode], r[mode]["kappa2_run_speedup_range"]
            s = {k: f"{1e3 * v:.1f}" for k, v in e["seconds_per_sample"].items()}
            out.append(f"| {mode} | {s['base_B']} | {s['base_kB']} | {s['ldb_full_B']} | {s['ldb_drop_B']} | "
                       f"{s['ldb_drop_kB']} | {_pct(e['kappa1_drop_step_ratio'] - 1)} / "
                       f"{_pct(e['kappa2_drop_step_ratio'] - 1)} | {_pct(e['kappa1_run_speedup'])} / "
                       f"{_pct(e['kappa2_run_speedup'])} [{_pct(lo_hi[0])}, {_pct(lo_hi[1])}] |")
        out.append("")
    return "\n".join(out)


def policies_table(data: dict) -> str:
    """bench_policies.py: FLOPs and step time of each policy variant vs the baseline."""
    rows = data["rows"]
    out = [f"**{rows[0]['model']}**", "",
           ("| variant | fwd GFLOP | bwd GFLOP | bwd FLOPs saved | step FLOPs saved | s/step "
            "| time saved [range] |"),
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["time_saved_range"]
        out.append(f"| {r['variant']} | {r['fwd_flops'] / 1e9:.1f} | {r['bwd_flops'] / 1e9:.1f} | "
                   f"{100 * r['bwd_flops_saved']:.1f}% | {100 * r['step_flops_saved']:.1f}% | {r['step_time']:.3f} | "
                   f"{_pct(r['time_saved'])} [{_pct(lo)}, {_pct(hi)}] |")
    return "\n".join(out)


def comm_table(data: dict) -> str:
    """ddp_comm.py: all-reduce bytes per step and step time, DDP's own all-reduce vs the hook."""
    meta, args = data["meta"], data["meta"]["args"]
    out = [f"{meta['date']}, torch {meta['torch']}, {meta['device_name']}, {args['ranks']} ranks "
           f"({args['threads']} thread each), batch {args['batch']} per rank, {args['resolution']} px, "
           f"{args['rounds']} rotated rounds of {args['steps']} steps", "",
           "| model | drop rate (actual) | MB/step DDP | MB/step hook | bytes saved | s/step DDP [range] "
           "| s/step hook [range] | time saved |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ddp, hook = r["step_time_ddp"], r["step_time_hook"]
        out.append(
            f"| {r['model']} | {r['drop_rate']} ({r['actual_drop_rate']:.2f}) | {r['bytes_per_step_ddp'] / 1e6:.1f} | "
            f"{r['bytes_per_step_hook'] / 1e6:.1f} | {100 * r['bytes_skipped_per_step'] / r['bytes_per_step_ddp']:.1f}% | "
            f"{ddp:.3f} [{r['step_time_ddp_range'][0]:.3f}, {r['step_time_ddp_range'][1]:.3f}] | "
            f"{hook:.3f} [{r['step_time_hook_range'][0]:.3f}, {r['step_time_hook_range'][1]:.3f}] | "
            f"{_pct(1 - hook / ddp)} |")
    return "\n".join(out)


def table(path: str) -> str:
    """The tables of one result file: one run (``.json``) or one per line (``.jsonl``)."""
    with open(path) as f:
        if path.endswith(".jsonl"):
            return "\n\n".join(run_table(json.loads(line)) for line in f if line.strip())
        return run_table(json.load(f))


def run_table(data: dict) -> str:
    if "bytes_per_step_ddp" in data["rows"][0]:
        return comm_table(data)
    if "variant" in data["rows"][0]:
        return policies_table(data)
    if "flop_bound_speedup" in data["rows"][0]:
        return speedup_table(data)
    meta, rows = data["meta"], data["rows"]
    args = meta["args"]
    out = [f"**{', '.join(args['models'])}** — {meta['date']}, torch {meta['torch']}, device "
           f"{meta['device_name']} ({meta['threads']} threads), batch {args['batch']}, "
           f"{args['resolution']} px, amp {args['amp'] or 'fp32'}, {args['rounds']} paired rounds of "
           f"{args['steps']} steps", ""]
    compiled = any("compiled_baseline" in r for r in rows)  # --compiled-fractions: some rows only
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
        if compiled and "compiled_baseline" in r:
            cells += [f"{r['compiled_baseline']:.3f}",
                      " / ".join(pct(r, f"compiled_{m}") for m in ("ideal", "ldbfx"))]
        elif compiled:
            cells += ["not timed", "not timed"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Target checks:", ""] + [f"- {c}" for c in data["checks"]]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    print("\n\n".join(table(p) for p in sys.argv[1:]))
