"""How long the model strategies take to choose a budget out of a large pool (issue 12: "1,000 of
100,000 unanswered images in seconds to minutes on a CPU"), on embeddings already computed.

The embeddings are synthetic: --pool unit vectors of --dim dimensions (1,280 is what the local
EfficientNet-Lite0 and a MobileNetV2 x1.0 give), drawn around --groups random centres so that
k-means has structure to find. What is timed is select.py's own work: k-center greedy
(diversity), TypiClust (typical), and the sort by entropy then k-center among 2 x budget
(hybrid), with --answered images already answered as centres or clusters' members. Computing the
embeddings is the model's forward pass, once per image and model (scoring.py caches it), and is
not included: on 2 cores the local teacher scores some tens of images a second.

    python benchmarks/select_bench.py                       # 100,000 waiting, 1,000 chosen
    python benchmarks/select_bench.py --answered 20000      # with 20,000 answered already
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill_app.harvest.select import HYBRID_POOL, k_center_greedy, typical_picks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=100_000, help="waiting images")
    ap.add_argument("--answered", type=int, default=0, help="images answered already")
    ap.add_argument("--budget", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=1_280)
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.groups, args.dim, generator=g)
    n = args.pool + args.answered
    points = centres[torch.randint(args.groups, (n,), generator=g)] + 0.5 * torch.randn(n, args.dim, generator=g)
    points = torch.nn.functional.normalize(points, dim=1)
    waiting, answered = points[:args.pool], points[args.pool:]
    entropy = torch.rand(args.pool, generator=g)
    row = {"pool": args.pool, "answered": args.answered, "budget": args.budget, "dim": args.dim,
           "threads": torch.get_num_threads()}
    for name, pick in [
        ("diversity", lambda: k_center_greedy(waiting, args.budget, answered)),
        ("typical", lambda: typical_picks(waiting, args.budget, answered, args.seed)),
        ("hybrid", lambda: k_center_greedy(waiting[torch.argsort(entropy, descending=True)[:HYBRID_POOL * args.budget]],
                                           args.budget, answered)),
    ]:
        start = time.perf_counter()
        picks = pick()
        row[f"{name}_s"] = round(time.perf_counter() - start, 2)
        assert len(set(picks)) == min(args.budget, args.pool)
        print(f"{name:10s} {row[f'{name}_s']:8.2f} s  ({len(picks)} of {args.pool:,} waiting, "
              f"{args.answered:,} answered)", file=sys.stderr)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
