"""One-off (issue 13, ninth pass): the share of freezing's saving read from per-round differences.

``benchmarks/compiled_path.py`` keeps each variant's minimum over rounds; on a noisy day those
minima swing by tens of ms between processes. Each round runs every variant back to back, so
the differences within a round cancel the drift between rounds. This reads a result file's
``rounds_ms`` (all processes) and prints, per ldbfx variant with drops,

    share = 1 - median(ldbfx - ideal) / median(baseline - ideal)

over the rounds, beside the minima's share the file reports.

    python benchmarks/adhoc/paired_share.py benchmarks/results/2026-12-03-cpu-compiled-path-native-run*.json
"""

from __future__ import annotations

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    for path in paths:
        for row in json.load(open(path))["rows"]:
            processes = row.get("per_process", [row])
            if any("rounds_ms" not in p for p in processes):  # older files kept only the minima
                continue
            rounds = [p["rounds_ms"] for p in processes]
            saving = statistics.median(b - i for r in rounds for b, i in zip(r["baseline"], r["ideal"]))
            for name in rounds[0]:
                if not name.startswith("ldbfx") or name.startswith("ldbfx0"):
                    continue
                above = statistics.median(a - i for r in rounds for a, i in zip(r[name], r["ideal"]))
                print(f"{path}: {row['model']} {name}: median(baseline - ideal) {saving:.1f} ms, "
                      f"median({name} - ideal) {above:+.1f} ms, share by medians {1 - above / saving:.0%} "
                      f"(minima: {row[name + '_share_of_ideal']:.0%})")


if __name__ == "__main__":
    main(sys.argv[1:])
