"""Redraw quality_bench's plot from the JSON output of several of its runs, each under a label:
the same recipe before and after a change of the product's defaults, say.

    python benchmarks/plot_quality.py "1,500 steps=/tmp/default3.log" \\
        "3,000 steps=/tmp/dq3000/b1000.out" "3,000 steps=/tmp/dqkeep/b500.out" --out quality-steps.png

Each file is what quality_bench.py printed (its last JSON line holds the rows); a row's recipe is
drawn as "LABEL: recipe", and the product's supervised figures (the `random` recipe, and the
labeller of `default`) as "LABEL: supervised".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_bench as qb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FILE: quality_bench.py's output")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args()
    supervised, rows = [], []
    for run in args.runs:
        label, _, path = run.partition("=")
        if not path:
            raise SystemExit(f"{run!r}: expected LABEL=FILE")
        last = [line for line in Path(path).read_text().splitlines() if line.startswith('{"rows"')][-1]
        for r in json.loads(last)["rows"]:
            # The labeller of `default` and the `random` run (nothing unanswered) are the product's
            # supervised run: one series per label. The labels are set here, so qb.plot adds none.
            if r.get("labeller_accuracy") is not None:
                supervised.append({**r, "recipe": f"{label}: supervised", "labeller_accuracy": None,
                                   "ratio": r["labeller_accuracy"] / r["teacher_accuracy"]})
            name = {"random": "supervised", "default": "default (Noisy Student)"}.get(r["recipe"], r["recipe"])
            rows.append({**r, "recipe": f"{label}: {name}", "labeller_accuracy": None})
    qb.plot(supervised + rows, args.out)


if __name__ == "__main__":
    main()
