"""Benchmark the redundancy threshold (METHOD §6.4 / C16). Prints ratios measured in one run, never bare times alone.

Ours: ``qpmcli.redundancy.reference_threshold(backend="fast")``, the reference procedure with our exact emulation of
networkx's greedy clique size and Ramsey-removal clique. Baseline: the same procedure calling networkx
(``backend="networkx"``: networkx graphs, ``nx.complement``, ``approximation.ramsey_R2``), the way the reference
runs it. Both run on the same R in the same process; the row also checks that they agree (tau, sweep step, start
clique). Target: <= 10 s for 512 features on 2 cores. A second row reports qpm's earlier greedy-bisect rule on the
same problem for comparison (its tau and penalised pairs differ: it is a different rule).

    python benchmarks/bench_threshold.py [--features 512] [--classes 200] [--target 50] [--quick] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness import provenance, write_result

STARTED = provenance()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--target", type=int, default=50, help="clique target = number of selected features K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a 160-feature problem (K = 24) instead")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.features, args.classes, args.target = 160, 60, 24

    from qpmcli import redundancy as rd
    from qpmcli.selection import _greedy_bisect_threshold, disallowed_pairs, synthetic_problem

    prob = synthetic_problem(args.features, args.classes, seed=args.seed, with_features=False)
    R = prob.R
    t0 = time.perf_counter()
    ours = rd.reference_threshold(R, args.target, backend="fast")
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = rd.reference_threshold(R, args.target, backend="networkx")
    t_base = time.perf_counter() - t0
    same = (ours.threshold == base.threshold and ours.step == base.step and ours.chosen == base.chosen
            and ours.clique == base.clique and ours.sizes == base.sizes)
    pairs = len(disallowed_pairs(R, ours.threshold)[0])
    t0 = time.perf_counter()
    bis = _greedy_bisect_threshold(R, args.target, 100, 32)
    t_bis = time.perf_counter() - t0
    pairs_bis = len(disallowed_pairs(R, bis.threshold)[0])
    what = f"reference threshold, fast vs networkx, synthetic_problem({args.features}, {args.classes}, " \
           f"seed={args.seed}), K={args.target}, seconds"
    rows = [
        {"what": what, "ours": round(t_ours, 3), "baseline": round(t_base, 3), "ratio": round(t_base / t_ours, 2),
         "target": "<= 10 s and identical", "met": bool(same and t_ours <= 10.0), "identical": same,
         "sweep_step": ours.step, "chosen": ours.chosen, "tau": ours.threshold, "penalised_pairs": pairs,
         "start_clique": len(ours.clique), "evaluated_steps": len(ours.sizes)},
        {"what": "greedy-bisect rule (the earlier qpm rule, an option) on the same problem, seconds",
         "ours": round(t_bis, 3), "baseline": round(t_ours, 3), "ratio": round(t_ours / t_bis, 2),
         "target": "(comparison only)", "met": True, "identical": None, "sweep_step": bis.step, "chosen": None,
         "tau": bis.threshold, "penalised_pairs": pairs_bis, "start_clique": bis.clique_size, "evaluated_steps": None},
    ]
    notes = (f"ratio = networkx time / fast time (same process, same R); CPUs {os.cpu_count()}. The reference rule "
             f"gives tau {ours.threshold:.5f} at sweep step {ours.step} ({pairs} penalised pairs); greedy-bisect "
             f"gives tau {bis.threshold:.5f} at step {bis.step} ({pairs_bis} pairs).")
    for row in rows:
        print(json.dumps(row))
    print(notes)
    write_result(args.json_out, {"benchmark": "threshold", "rows": rows, "notes": notes}, started=STARTED)


if __name__ == "__main__":
    main()
