"""Selection benchmark: our ``qpm`` solver against baselines and against proven optima.

Two parts, each measured in one process:

``cub`` (default): a CUB-sized instance (512 features, 200 classes, 50 x 5) with structured, seedable A/R
(``synthetic_problem``: low-rank class families, redundant and dead ReLU features, A and R computed as from a dense
model), or a trained dense model's A/R (``--problem``). Rows: the greedy start, the plain CP-SAT model of METHOD §6.5
with the greedy hint, ours, each at ``--time-limit`` and ``--long`` seconds, and optionally the solver of an earlier
commit at ``--time-limit`` (``--compare-commit``, read with ``git show``) on the same instance.

``licence``: ~42 instances small enough for Gurobi's size-limited pip licence (n_f 24-64, C 8-35, K 8-12, k 2-3,
including the ones where distinct class sets bind: C = 20, K = 8, k = 2 and C = 35, K = 12, k = 3). Gurobi
(``gurobi`` selector's model) gives the proven optimum; ours runs once at the longest limit and its objective at 5 and
15 s is read from the run's trajectory: the search is one continuing deterministic search, so a run with a shorter
limit stops on that trajectory (it can only end slightly higher, by a local search round that the limit truncates).

    python benchmarks/bench_selection.py [--quick] [--time-limit 60] [--long 300] [--workers 8] [--json-out PATH]
                                         [--problem RUN_DIR_OR_NPZ] [--compare-commit REV] [--bound auto]
                                         [--skip-plain] [--skip-ours] [--ils-rounds N] [--start-rounds N]
                                         [--no-ils-growth]
    python benchmarks/bench_selection.py --licence [--limits 5,15,60] [--gurobi-limit 60] [--workers 2]
                                         [--instances N] [--json-out PATH] [--oracle GUROBI.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time


def licence_instances() -> list[tuple[int, int, int, int, int]]:
    """(n_f, C, K, k, seed): 12 where distinct sets bind, then 30 drawn (seeded) from the grid that fits the licence
    (n_f * C + 2 n_f <= 1950: the x and s variables and the per-feature rows)."""
    import numpy as np

    hard = [(n, 20, 8, 2, s) for s, n in enumerate((24, 32, 40, 48, 56, 64))]
    hard += [(n, 35, 12, 3, s) for s, n in enumerate((24, 32, 40, 48, 52, 40), start=6)]
    grid = [(n, C, K, k) for C in (8, 12, 20, 28, 35) for n in (24, 32, 40, 48, 56, 64) for K in (8, 10, 12)
            for k in (2, 3) if n * C + 2 * n <= 1950 and math.comb(K, k) >= C]
    pick = np.random.default_rng(2026).choice(len(grid), size=30, replace=False)
    return hard + [(*grid[i], 100 + j) for j, i in enumerate(sorted(pick))]


def at_time(traj: list, t: float) -> tuple[float, float | None]:
    """(objective, bound) of a trajectory [[seconds, objective, bound], ...] at time t."""
    obj, bnd = -math.inf, None
    for sec, v, b in traj:
        if sec <= t + 1e-9:
            obj, bnd = v, b
    return obj, bnd


def run_licence(args) -> dict:
    from qpm_plugins.selectors import qpm as Q
    from qpm_plugins.selectors.gurobi import solve_gurobi

    from qpmcli.selection import synthetic_problem

    limits = [float(x) for x in args.limits.split(",")]
    T = max(limits)
    rows = []
    oracle: dict[str, dict] = {}
    if args.oracle and os.path.exists(args.oracle):  # Gurobi's results of an earlier sweep (same instances)
        with open(args.oracle) as fh:
            oracle = {str(r["instance"]): r for r in json.load(fh)}
    for n, C, K, k, seed in licence_instances()[: args.instances]:
        prob = synthetic_problem(n, C, seed=seed, n_samples=30 * C)
        inst = Q.make_instance(prob, K, k)
        key = str([n, C, K, k, seed])
        if key not in oracle:
            g = solve_gurobi(inst, time_limit=args.gurobi_limit, workers=args.workers,
                             start=inst.clique[:K] if len(inst.clique) >= K else None)
            oracle[key] = {"instance": [n, C, K, k, seed], "objective": g["objective"], "bound": g["bound"],
                           "seconds": g["seconds"], "limit": args.gurobi_limit}
            if args.oracle:
                with open(args.oracle, "w") as fh:
                    json.dump(list(oracle.values()), fh, indent=1)
        g = oracle[key]
        g_proven = Q.gap_of(g["objective"], max(g["bound"], g["objective"])) <= Q.OPT_TOL
        res = Q.solve(inst, time_limit=T, seed=0, workers=args.workers, progress=False)
        traj = res.stats["trajectory"]
        opt = g["objective"] if g_proven else None
        ref = max(g["objective"], res.objective)  # best known when Gurobi did not prove
        row = {"instance": [n, C, K, k, seed], "pairs": int(len(inst.pairs)), "gurobi_objective": g["objective"],
               "gurobi_bound": g["bound"], "gurobi_proven": g_proven, "gurobi_seconds": round(g["seconds"], 2),
               "ours_objective": res.objective, "ours_bound": res.bound, "ours_status": res.status,
               "ours_seconds": res.stats["seconds"], "trajectory": traj}
        for t in limits:
            v, b = at_time(traj, t) if t < T else (res.objective, res.bound)
            row[f"obj@{t:g}"] = v
            row[f"shortfall@{t:g}"] = (ref - v) / abs(ref)
            row[f"optimal@{t:g}"] = opt is not None and v >= opt - Q.OPT_TOL * abs(opt)
        hit = [sec for sec, v, _ in traj if opt is not None and v >= opt - Q.OPT_TOL * abs(opt)]
        row["time_to_optimum"] = hit[0] if hit else None
        row["bound_valid"] = opt is None or res.bound >= opt - 1e-6 * abs(opt)
        rows.append(row)
        if args.json_out:  # partial results survive an interrupted sweep
            with open(args.json_out + ".partial", "w") as fh:
                json.dump(rows, fh, default=float)
        print(f"{n}x{C} K={K} k={k} seed {seed}: gurobi {g['objective']:.4f} "
              f"({'proven' if g_proven else 'bound ' + format(g['bound'], '.4f')}, {g['seconds']:.1f} s) | ours "
              + " ".join(f"{t:g}s {row[f'obj@{t:g}']:.4f}" for t in limits)
              + f" bound {res.bound:.4f} {res.status} ({res.stats['seconds']:.1f} s)", flush=True)
    summary = {}
    for t in limits:
        short = [r[f"shortfall@{t:g}"] for r in rows]
        summary[f"{t:g}s"] = {"optimal": sum(r[f"optimal@{t:g}"] for r in rows), "instances": len(rows),
                              "mean_shortfall": sum(short) / len(short), "worst_shortfall": max(short)}
    tto = sorted(r["time_to_optimum"] for r in rows if r["time_to_optimum"] is not None)
    summary["time_to_optimum_median"] = tto[len(tto) // 2] if tto else None
    summary["time_to_optimum_max"] = tto[-1] if tto else None
    summary["gurobi_proven"] = sum(r["gurobi_proven"] for r in rows)
    summary["ours_says_optimal"] = sum(r["ours_status"] == "OPTIMAL" for r in rows)
    summary["bound_always_valid"] = all(r["bound_valid"] for r in rows)
    print(json.dumps(summary, indent=1))
    return {"benchmark": "selection-licence", "summary": summary, "rows": rows,
            "notes": f"{args.workers} workers on {os.cpu_count()} cpus (shared machine); gurobi limit "
                     f"{args.gurobi_limit:g} s"}


def load_commit_solver(rev: str):
    """The ``qpm`` selector module of an earlier commit, imported from ``git show`` (for like-for-like runs)."""
    import importlib.util
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:plugins/selectors/qpm.py"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    path = os.path.join(tempfile.mkdtemp(), f"qpm_{rev}.py")
    with open(path, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location(f"qpm_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_cub(args) -> dict:
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
    runs: dict = {"greedy": {"objective": greedy_obj}}
    print(f"greedy {greedy_obj:.4f}", flush=True)

    def plain(limit: float) -> dict:
        res = Q.cpsat_solve(inst, inst.n, S_g, limit, workers=args.workers, seed=args.seed, deterministic=False,
                            mode="full")
        obj = greedy_obj
        if res.selection is not None and len(res.selection) == 50:
            obj = max(obj, inst.selection_value(res.selection))  # its feature set, exactly assigned
        out = {"seconds": limit, "objective": obj, "bound": res.bound, "gap": Q.gap_of(obj, res.bound),
               "status": res.status}
        print(f"plain CP-SAT {limit:.0f}s: {obj:.4f} bound {res.bound:.4f} gap {100 * out['gap']:.2f}%", flush=True)
        return out

    def ours(limit: float) -> dict:
        from qpm_plugins.selectors.qpm import bound_sources, bound_stats

        sources = bound_sources(args.bound, inst, None, limit)
        res = Q.solve(inst, time_limit=limit, seed=args.seed, workers=args.workers, progress=False,
                      bound_sources=sources, ils_growth=not args.no_ils_growth,
                      **({"ils_rounds": args.ils_rounds} if args.ils_rounds else {}),
                      **({"start_rounds": args.start_rounds} if args.start_rounds >= 0 else {}))
        res.stats.update(bound_stats(args.bound, sources, res.stats, res.bound))
        ok = (res.W.sum(1) == 5).all() and len({r.tobytes() for r in res.W}) == C and len(set(res.S)) == 50
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux reports KiB)
        out = {"seconds": limit, "objective": res.objective, "bound": res.bound, "gap": res.gap, "status": res.status,
               "constraints_hold": bool(ok), "process_peak_rss_gib": round(peak, 3), "stats": res.stats}
        print(f"ours {limit:.0f}s: {res.objective:.4f} bound {res.bound:.4f} gap {100 * res.gap:.2f}% "
              f"(bound from {res.stats.get('bound_from')}; constraints hold: {ok})", flush=True)
        return out

    if args.compare_commit:
        old = load_commit_solver(args.compare_commit)
        old_inst = old.make_instance(prob, 50, 5)
        r = old.solve(old_inst, time_limit=T, seed=args.seed, workers=args.workers, progress=False)
        v = inst.value(r.S, r.W.astype(bool))
        runs[f"commit_{args.compare_commit}"] = {"seconds": T, "objective": v, "bound": r.bound, "gap": r.gap}
        print(f"solver of {args.compare_commit} {T:.0f}s: {v:.4f} bound {r.bound:.4f}", flush=True)
    if not args.skip_ours:
        runs["ours"] = ours(T)
    if not args.skip_plain:
        runs["plain_cpsat"] = plain(T)
    if long_T > 0:
        if not args.skip_ours:
            runs["ours_long"] = ours(long_T)
        if not args.skip_plain:
            runs["plain_cpsat_long"] = plain(long_T)
    return {"benchmark": "selection", "runs": runs,
            "notes": f"{source}; {args.workers} CP-SAT workers on {os.cpu_count()} cpus (shared machine)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 features, 100 classes, 10 s, no long run")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--long", type=float, default=300.0, help="the longer time limit (0: skip)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--problem", default=None, help="run directory or .npz with A and R (default: synthetic)")
    ap.add_argument("--compare-commit", default=None, help="also run the qpm solver of this git revision")
    ap.add_argument("--bound", default="auto", choices=("lp", "sdp", "auto"),
                    help="the qpm selector's bound source (as qpm select --bound); the licence part uses its own")
    ap.add_argument("--skip-plain", action="store_true", help="no plain CP-SAT rows")
    ap.add_argument("--no-ils-growth", action="store_true",
                    help="qpm rows: a fixed number of local-search rounds per cycle (solve(ils_growth=False))")
    ap.add_argument("--ils-rounds", type=int, default=0, help="qpm rows: local-search rounds per cycle (solve's "
                                                               "ils_rounds; 0: its default)")
    ap.add_argument("--start-rounds", type=int, default=-1, help="qpm rows: iterated-search rounds from each start "
                                                                  "(solve's start_rounds; -1: its default)")
    ap.add_argument("--skip-ours", action="store_true", help="no qpm rows (e.g. plain CP-SAT rows alone)")
    ap.add_argument("--licence", action="store_true", help="ours vs Gurobi's proven optimum on small instances")
    ap.add_argument("--limits", default="5,15,60")
    ap.add_argument("--gurobi-limit", type=float, default=60.0)
    ap.add_argument("--instances", type=int, default=42)
    ap.add_argument("--oracle", default=None, help="JSON of Gurobi's results: read if present (instances in it are "
                                                   "not solved again), else written")
    args = ap.parse_args()
    result = run_licence(args) if args.licence else run_cub(args)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
