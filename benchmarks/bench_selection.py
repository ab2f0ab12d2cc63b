"""Selection benchmark: our ``qpm`` solver vs (a) the greedy start and (b) the plain CP-SAT model of METHOD §6.5.

CUB-sized instance (512 features, 200 classes, 50 x 5) with structured, seedable A/R (``synthetic_problem``: low-rank
class families, redundant and dead ReLU features, A and R computed as from a dense model). Same hint (greedy) and the
same time limit for the plain model. Prints ratios measured in this one process.

    python benchmarks/bench_selection.py [--quick] [--time-limit 60] [--long 300] [--workers 8] [--json-out PATH]
                                         [--problem RUN_DIR_OR_NPZ]

``--problem`` takes the A/R of a trained dense model instead: a run directory of ``qpm train`` (its
dense_features.npz) or an .npz with A and R, as ``qpm select --problem`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 features, 100 classes, 10 s, no long run")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--long", type=float, default=300.0, help="time limit of the certified-gap run (0: skip)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--problem", default=None, help="run directory or .npz with A and R (default: synthetic)")
    args = ap.parse_args()

    from pathlib import Path

    from qpm_plugins.selectors import qpm as Q

    from qpmcli.selection import load_problem_npz, problem_from_run, synthetic_problem

    n, C, T = (256, 100, 10.0) if args.quick else (512, 200, args.time_limit)
    long_T = 0.0 if args.quick else args.long
    if args.problem:
        prob = problem_from_run(args.problem) if Path(args.problem).is_dir() else load_problem_npz(args.problem)
        n, C = prob.A.shape
        source = f"problem {args.problem}"
    else:
        prob = synthetic_problem(n, C, seed=args.seed)
        source = f"synthetic {n}x{C} seed {args.seed}"
    t0 = time.perf_counter()
    inst = Q.make_instance(prob, 50, 5)
    setup = time.perf_counter() - t0
    print(f"instance {n}x{C}, K=50, k=5: {len(inst.pairs)} penalised pairs (threshold {inst.threshold:.4f}), "
          f"setup {setup:.1f} s, cpus {os.cpu_count()}", flush=True)

    S_g = Q.greedy(inst)
    W_g = Q.assign(inst, S_g)
    greedy_obj = inst.value(S_g, W_g)

    plain = Q.cpsat_solve(inst, inst.n, S_g, T, workers=args.workers, seed=args.seed, deterministic=False,
                          mode="full")
    plain_obj = greedy_obj
    if plain.selection is not None:
        cands = []
        if plain.assignment is not None:
            cands.append((plain.selection, plain.assignment))
        cands.append((plain.selection, Q.assign(inst, plain.selection)))
        plain_obj = max(inst.value(S, W) for S, W in cands
                        if (W.sum(1) == 5).all() and len({r.tobytes() for r in W}) == C)
    plain_gap = Q._gap(plain_obj, plain.bound)
    print(f"greedy {greedy_obj:.4f} | plain CP-SAT {T:.0f}s: {plain_obj:.4f} bound {plain.bound:.4f} "
          f"gap {100 * plain_gap:.2f}% ({plain.status})", flush=True)

    ours = Q.solve(inst, time_limit=T, seed=args.seed, workers=args.workers, progress=False)
    print(f"ours {T:.0f}s: {ours.objective:.4f} bound {ours.bound:.4f} gap {100 * ours.gap:.2f}% ({ours.status})",
          flush=True)
    rows = [
        {"what": f"objective, ours / greedy start ({T:.0f} s)", "ours": ours.objective, "baseline": greedy_obj,
         "ratio": ours.objective / greedy_obj, "target": "> 1", "met": ours.objective > greedy_obj},
        {"what": f"objective, ours / plain CP-SAT with greedy hint ({T:.0f} s)", "ours": ours.objective,
         "baseline": plain_obj, "ratio": ours.objective / plain_obj, "target": "> 1",
         "met": ours.objective > plain_obj},
        {"what": f"certified gap, ours vs plain CP-SAT ({T:.0f} s)", "ours": ours.gap, "baseline": plain_gap,
         "ratio": ours.gap / plain_gap if plain_gap > 0 else None, "target": "< 1", "met": ours.gap < plain_gap},
    ]
    longer = None
    if long_T > 0:
        longer = Q.solve(inst, time_limit=long_T, seed=args.seed, workers=args.workers, progress=False)
        print(f"ours {long_T:.0f}s: {longer.objective:.4f} bound {longer.bound:.4f} gap {100 * longer.gap:.2f}%",
              flush=True)
        rows.append({"what": f"certified gap, ours ({long_T:.0f} s)", "ours": longer.gap, "baseline": 0.01,
                     "ratio": longer.gap / 0.01, "target": "gap <= 1%", "met": longer.gap <= 0.01})
    for row in rows:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.4f}"
        print(f"  {row['what']}: ratio {ratio} (target {row['target']}, met={row['met']})")
    runs = {"greedy": {"objective": greedy_obj},
            "plain_cpsat": {"seconds": T, "objective": plain_obj, "bound": plain.bound, "gap": plain_gap,
                            "status": plain.status},
            "ours": {"seconds": T, "objective": ours.objective, "bound": ours.bound, "gap": ours.gap,
                     "stats": ours.stats}}
    if longer is not None:
        runs["ours_long"] = {"seconds": long_T, "objective": longer.objective, "bound": longer.bound,
                             "gap": longer.gap, "stats": longer.stats}
    result = {"benchmark": "selection", "rows": rows, "runs": runs,
              "notes": f"{source}; {args.workers} CP-SAT workers on {os.cpu_count()} cpus; "
                       f"ours stats: {json.dumps(ours.stats, default=float)}"}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
