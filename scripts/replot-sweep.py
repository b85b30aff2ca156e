"""Redraw a sweep's metric_vs_nfe.png from its results.csv (e.g. a published table in docs/results/).

    python scripts/replot-sweep.py docs/results/fmnist-2026-11-25 --num 10000
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fewstep.sweep.report import metric_chart


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--num", type=int, required=True, help="samples per NFE the table was measured on")
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.sweep_dir / "results.csv")))
    nfes = [int(c[len("nfe_"):]) for c in rows[0] if c.startswith("nfe_")]
    scores = {r["member"]: {str(n): float(r[f"nfe_{n}"]) for n in nfes if r[f"nfe_{n}"]} for r in rows}
    print(metric_chart(args.sweep_dir / "metric_vs_nfe.png", rows[0]["metric"], args.num, nfes, scores))


if __name__ == "__main__":
    main()
