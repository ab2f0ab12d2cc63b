"""Selection benchmark: the ``qpm`` selector at CUB size, at ImageNet size, against proven optima.

Parts (``--parts``, comma separated; default ``cub,imagenet,growth``), each measured in this process or in child
processes it starts; the JSON (``--json-out``) has ``rows`` ({"what", "ours", "baseline", "ratio", "target",
"met"}, docs/design.md "Benchmarks"), the raw ``runs`` (each with the load average it ran under) and, from
``benchmarks/harness.py``, the provenance (git revision, argv, machine, load average at the start and the end):

``cub``: a CUB-sized instance (``synthetic_problem(512, 200, seed=0)``, or a trained dense model's A/R with
``--problem``), K = 50, k = 5. Rows: ours against the greedy start and the plain CP-SAT model of METHOD §6.5 (greedy
hint) at ``--time-limit``, ours at ``--long`` against ours at ``--time-limit`` (more time never worse), and ours with
a work limit (1 and 3 cycles, no bound source: the same on any machine) against the values recorded from the solver
of commit 967bb26 (before issue 31). ``--compare-commit REV`` also runs an earlier revision's solver, in a child
process that imports that revision's ``plugins/`` (works for the single-module and the package layout).

``imagenet``: ``qpm select`` itself, as a user runs it (a child process; its wall time includes the interpreter's
start, reading the problem file and the instance's setup), on ``synthetic_problem(n, C, seed=0)`` saved as .npz, for
each of ``--sizes`` at each of ``--limits``: objective, certified bound, gap, seconds over the limit, the child's peak
RSS. ``--done-when`` runs exactly the rows of issue 31's list: 512 x 1000 at 300 s and 600 s, 2048 x 1000 at 300 s
(and the ``cub`` part's rows without plain CP-SAT).

``growth``: the same command on 512 features and C = 200, 400, 600, 800, 1000 classes at ``--growth-limit`` seconds:
how setup, the starts, wall time and peak RSS grow with C.

``licence``: ~42 instances small enough for Gurobi's size-limited pip licence (n_f 24-64, C 8-35, K 8-12, k 2-3,
including the ones where distinct class sets bind: C = 20, K = 8, k = 2 and C = 35, K = 12, k = 3). Gurobi
(``gurobi`` selector's model) gives the proven optimum; ours runs once at the longest limit and its objective at 5 and
15 s is read from the run's trajectory: the search is one continuing deterministic search, so a run with a shorter
limit stops on that trajectory (it can only end slightly higher, by a local search round that the limit truncates).

    python benchmarks/bench_selection.py [--quick] [--parts cub,imagenet,growth] [--json-out PATH]
        cub:      [--time-limit 60] [--long 300] [--workers 8] [--problem RUN_DIR_OR_NPZ] [--compare-commit REV]
                  [--bound auto] [--skip-plain] [--ils-rounds N] [--start-rounds N] [--no-ils-growth]
        imagenet: [--sizes 512x1000,2048x1000] [--limits 60,300,600] [--data-dir DIR] | --done-when
        growth:   [--growth-limit 60] [--growth-classes 200,400,600,800,1000]
    python benchmarks/bench_selection.py --parts licence [--licence-limits 5,15,60] [--gurobi-limit 60] [--workers 2]
                                         [--instances N] [--json-out PATH] [--oracle GUROBI.json]

The rows the lead re-measures on a quiet machine (issue 31's done-when list, about 25 minutes):

    python benchmarks/bench_selection.py --done-when --json-out benchmarks/results/bench_selection.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, provenance, write_result

STARTED = provenance()
# Issue 31's measurements of the solver before it (512 x 1000, qpm select --time-limit 300): the baselines of its rows
ISSUE31 = {"wall": 388.0, "peak_rss_gib": 8.7 / 1.073741824, "objective": 289.08, "gap": 0.0183}
# The solver of commit 967bb26 (before issue 31) on synthetic_problem(512, 200, seed=0), K = 50, k = 5, seed 0,
# 2 workers, no bound source, work_limit = cycles: {cycles: objective} (deterministic: the same on any machine)
CUB_WORK_BEFORE = {1: 341.1160296421901, 3: 341.1160296421901}
CUB_60S_RECORD = 341.116  # benchmarks/results/selection.md, third session, quiet machine


def row(what: str, ours, baseline=None, target: str = "-", met: bool | None = None) -> dict:
    """One result row; a value that is not a finite number (no bound yet: an infinite gap) is written as null."""
    if isinstance(ours, float) and not math.isfinite(ours):
        ours = None
    ratio = None
    if isinstance(ours, int | float) and isinstance(baseline, int | float) and baseline and math.isfinite(ours):
        ratio = round(ours / baseline, 4)
    return {"what": what, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target, "met": met}


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

    limits = [float(x) for x in args.licence_limits.split(",")]
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
    proven = summary["gurobi_proven"]
    summary_rows = [row(f"licence-sized: Gurobi's proven optima reached at {t:g} s", summary[f"{t:g}s"]["optimal"],
                        proven, f"= {proven}", summary[f"{t:g}s"]["optimal"] == proven) for t in limits]
    summary_rows.append(row("licence-sized: bound never below a proven optimum", summary["bound_always_valid"],
                            True, "true", summary["bound_always_valid"]))
    return {"summary": summary, "instances": rows, "summary_rows": summary_rows,
            "notes": f"{args.workers} workers on {os.cpu_count()} cpus; gurobi limit {args.gurobi_limit:g} s"}


# ------------------------------------------------------------------------------------------------------------ cub
def run_cub(args) -> tuple[list[dict], dict]:
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
    print(f"cub: instance {source}, K=50, k=5: {len(inst.pairs)} penalised pairs (threshold {inst.threshold:.4f}), "
          f"setup {setup:.1f} s, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)

    S_g = Q.greedy(inst)
    greedy_obj = inst.value(S_g, Q.assign(inst, S_g))
    runs: dict = {"source": source, "greedy": {"objective": greedy_obj}}
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

    def ours(limit: float, work_limit: int | None = None) -> dict:
        from qpm_plugins.selectors.qpm import bound_sources, bound_stats

        sources = [] if work_limit else bound_sources(args.bound, inst, None, limit)
        load = os.getloadavg()[0]
        res = Q.solve(inst, time_limit=limit, seed=args.seed, workers=2 if work_limit else args.workers,
                      progress=False, bound_sources=sources, ils_growth=not args.no_ils_growth,
                      work_limit=work_limit, **({"ils_rounds": args.ils_rounds} if args.ils_rounds else {}),
                      **({"start_rounds": args.start_rounds} if args.start_rounds >= 0 else {}))
        res.stats.update(bound_stats(args.bound, sources, res.stats, res.bound))
        ok = (res.W.sum(1) == 5).all() and len({r.tobytes() for r in res.W}) == C and len(set(res.S)) == 50
        out = {"seconds": limit, "work_limit": work_limit, "objective": res.objective, "bound": res.bound,
               "gap": res.gap, "status": res.status, "constraints_hold": bool(ok), "load_before": load,
               "stats": res.stats}
        what = f"{work_limit} cycles" if work_limit else f"{limit:.0f}s"
        print(f"ours {what}: {res.objective:.4f} bound {res.bound:.4f} gap {100 * res.gap:.2f}% "
              f"(bound from {res.stats.get('bound_from')}; constraints hold: {ok}; "
              f"{res.stats['seconds']:.0f} s, load {load:.1f})", flush=True)
        return out

    rows = []
    if args.compare_commit:
        runs[f"commit_{args.compare_commit}"] = old = commit_solve(args.compare_commit, prob, T, args)
        rows.append(row(f"objective, ours / solver of {args.compare_commit} ({T:.0f} s)", None, old["objective"]))
    if not args.skip_ours:
        runs["ours"] = mine = ours(T)
        rows.append(row(f"objective, ours / greedy start ({T:.0f} s)", mine["objective"], greedy_obj, "> 1",
                        mine["objective"] > greedy_obj))
        if args.compare_commit:
            rows[0].update(ours=mine["objective"], ratio=round(mine["objective"] / old["objective"], 4),
                           target=">= 1", met=mine["objective"] >= old["objective"] - 1e-9)
        if not args.problem and not args.quick and T == 60:
            rows.append(row("objective at 60 s, ours / the record of selection.md (quiet machine; load-dependent)",
                            mine["objective"], CUB_60S_RECORD, ">= 1 on a quiet machine",
                            mine["objective"] >= CUB_60S_RECORD - 1e-3))
    if not args.skip_plain:
        runs["plain_cpsat"] = base = plain(T)
        if "ours" in runs:
            rows.append(row(f"objective, ours / plain CP-SAT with greedy hint ({T:.0f} s)", runs["ours"]["objective"],
                            base["objective"], "> 1", runs["ours"]["objective"] > base["objective"]))
            rows.append(row(f"certified gap, ours / plain CP-SAT ({T:.0f} s)", runs["ours"]["gap"], base["gap"],
                            "< 1", runs["ours"]["gap"] < base["gap"]))
    if long_T > 0 and not args.skip_ours:
        runs["ours_long"] = mine_long = ours(long_T)
        rows.append(row(f"objective, ours {long_T:.0f} s / ours {T:.0f} s (more time never worse)",
                        mine_long["objective"], runs["ours"]["objective"], ">= 1",
                        mine_long["objective"] >= runs["ours"]["objective"] - 1e-9))
        rows.append(row(f"certified gap, ours {long_T:.0f} s", mine_long["gap"], None, "-"))
    if not args.problem and not args.quick and not args.skip_ours:
        for cycles, before in CUB_WORK_BEFORE.items():
            runs[f"ours_work_{cycles}"] = work = ours(math.inf, work_limit=cycles)
            rows.append(row(f"objective after {cycles} cycle(s), work-limited, ours / solver of 967bb26 "
                            f"(machine-independent)", work["objective"], before, ">= 1",
                            work["objective"] >= before - 1e-9))
    return rows, runs


def commit_solve(rev: str, prob, limit: float, args) -> dict:
    """The ``qpm`` solver of revision ``rev`` on ``prob``, in a child process whose ``qpm_plugins`` is that
    revision's ``plugins/`` (``git archive``; sys.path comes before the editable install's finder)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", rev, "plugins"], capture_output=True, check=True, cwd=ROOT).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / "plugins").rename(tree / "qpm_plugins")
        np.savez(Path(tmp) / "problem.npz", A=prob.A, R=prob.R)
        code = ("import json, sys, numpy as np\n"
                "from qpm_plugins.selectors import qpm as Q\n"
                "from qpmcli.selection import load_problem_npz\n"
                "assert Q.__file__.startswith(sys.argv[1]), Q.__file__\n"
                "inst = Q.make_instance(load_problem_npz(sys.argv[2]), 50, 5)\n"
                "r = Q.solve(inst, time_limit=float(sys.argv[3]), seed=int(sys.argv[4]), workers=int(sys.argv[5]),"
                " progress=False)\n"
                "print(json.dumps({'objective': r.objective, 'bound': r.bound if np.isfinite(r.bound) else None,"
                " 'features': [int(f) for f in r.S]}))\n")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run([sys.executable, "-c", code, str(tree), str(Path(tmp) / "problem.npz"), str(limit),
                              str(args.seed), str(args.workers)], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"solver of {rev} {limit:.0f}s: {res['objective']:.4f} bound {res['bound']}", flush=True)
    return {"seconds": limit, **res}


# ------------------------------------------------------------------------------------------------------ imagenet
def problem_file(n: int, C: int, data_dir: Path) -> Path:
    """``synthetic_problem(n, C, seed=0)`` as an .npz of A and R (made once; 17 s and 2 GB at 2048 x 1000)."""
    path = data_dir / f"synthetic-{n}x{C}-seed0.npz"
    if not path.is_file():  # in a child process: this one stays small while it measures others
        code = ("import sys, numpy as np\n"
                "from qpmcli.selection import synthetic_problem\n"
                "p = synthetic_problem(int(sys.argv[1]), int(sys.argv[2]), seed=0, with_features=False)\n"
                "np.savez(sys.argv[3], A=p.A, R=p.R)\n")
        tmp = path.with_suffix(".tmp.npz")
        subprocess.run([sys.executable, "-c", code, str(n), str(C), str(tmp)], check=True)
        tmp.rename(path)
    return path


def cli_select(problem: Path, limit: float, workers: int, extra: list[str] | None = None) -> dict:
    """``qpm select --problem FILE --features 50 --per-class 5 --time-limit LIMIT`` in a child process: its wall
    time (start to exit), peak RSS (the child's own, from wait4) and the selection it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "selection.json"
        cmd = [sys.executable, "-c", "import sys; from qpmcli.cli import main; sys.exit(main())", "select",
               "--problem", str(problem), "--features", "50", "--per-class", "5", "--time-limit", f"{limit:g}",
               "--workers", str(workers), "--quiet", "--out", str(out), *(extra or [])]
        load = os.getloadavg()
        t0 = time.perf_counter()
        with open(Path(tmp) / "stderr", "w+b") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            hwm = 0.0
            while proc.poll() is None:  # the child's own high-water mark (ru_maxrss would count ours too)
                hwm = max(hwm, vm_hwm_gib(proc.pid))
                time.sleep(0.2)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"qpm select exited {proc.returncode}: {tail}")
        sel = json.loads(out.read_text())
    p = sel["params"]
    # the larger of what we saw and what the child recorded at the end of its selection (VmHWM, MiB)
    peak = max(hwm, (p.get("peak_rss_mib") or 0) / 2**10)
    keep = ("setup_seconds", "step_seconds", "peak_rss_growth_mib", "peak_rss_mib", "schedule", "cycles",
            "ils_rounds", "time_to_best", "bound_method", "bound_from", "sdp_seconds", "lp_seconds", "sdp_abandoned",
            "penalised_pairs", "trajectory", "seconds")
    return {"limit": limit, "wall": round(wall, 2), "over": round(wall - limit, 2), "peak_rss_gib": round(peak, 3),
            "objective": sel["objective"], "bound": sel["bound"], "gap": sel["gap"], "status": sel["status"],
            "loadavg_before": [round(v, 2) for v in load], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "command": "qpm " + " ".join(cmd[3:]), "params": {k: p.get(k) for k in keep},
            "sdp": {k: v for k, v in (p.get("sdp") or {}).items() if k in ("iterations", "chunks", "setup_seconds",
                                                                           "memory", "status")}}


def vm_hwm_gib(pid: int) -> float:
    """VmHWM (peak resident memory) of a running process, GiB; 0 where /proc is not there."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def over_target(limit: float) -> float:
    """Seconds over the limit allowed for the whole command: issue 31's 315 s at 300 s, i.e. 5 %, at least 5 s."""
    return max(5.0, 0.05 * limit)


def run_imagenet(args) -> tuple[list[dict], dict]:
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.done_when:
        plan = [((512, 1000), 300.0), ((512, 1000), 600.0), ((2048, 1000), 300.0)]
    elif args.quick:
        plan = [((256, 400), 10.0), ((512, 1000), 20.0)]
    else:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
        plan = [(size, float(t)) for size in sizes for t in args.limits.split(",") if t]
    rows, runs = [], {}
    for (n, C), limit in plan:
        path = problem_file(n, C, data_dir)
        r = cli_select(path, limit, args.workers)
        runs[f"{n}x{C}@{limit:g}"] = r
        print(f"imagenet {n}x{C} at {limit:g} s: objective {r['objective']:.3f} bound {r['bound']:.3f} gap "
              f"{100 * r['gap']:.2f}% wall {r['wall']:.1f} s ({r['over']:+.1f}) peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(load {r['loadavg_before'][0]:.1f})", flush=True)
        tag = f"{n} x {C}, {limit:g} s"
        issue = (n, C) == (512, 1000) and limit == 300
        rows.append(row(f"{tag}: seconds of qpm select past its limit", r["over"],
                        ISSUE31["wall"] - 300 if issue else None, f"<= {over_target(limit):g}",
                        r["over"] <= over_target(limit)))
        mem_cap = 4.0 if (n, C) == (512, 1000) else 8.0 if (n, C) == (2048, 1000) else None
        rows.append(row(f"{tag}: peak RSS of qpm select (GiB)", r["peak_rss_gib"],
                        round(ISSUE31["peak_rss_gib"], 2) if issue else None,
                        f"<= {mem_cap:g}" if mem_cap else "-",
                        r["peak_rss_gib"] <= mem_cap if mem_cap else None))
        if (n, C) == (512, 1000) and limit >= 300:
            gap_cap = 0.015 if limit == 300 else 0.012
            rows.append(row(f"{tag}: objective", r["objective"], ISSUE31["objective"], ">= 289.08",
                            r["objective"] >= ISSUE31["objective"] - 5e-3))
            rows.append(row(f"{tag}: certified gap", r["gap"], ISSUE31["gap"] if issue else None,
                            f"<= {100 * gap_cap:g} %", r["gap"] <= gap_cap))
        else:
            rows.append(row(f"{tag}: objective (bound {r['bound']:.3f})", r["objective"]))
            rows.append(row(f"{tag}: certified gap", r["gap"]))
    return rows, runs


def run_growth(args) -> tuple[list[dict], dict]:
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    classes = [100, 200] if args.quick else [int(c) for c in args.growth_classes.split(",") if c]
    limit = 10.0 if args.quick else args.growth_limit
    rows, runs, first = [], {}, None
    for C in classes:
        r = cli_select(problem_file(512, C, data_dir), limit, args.workers)
        runs[f"512x{C}@{limit:g}"] = r
        steps = r["params"].get("step_seconds") or {}
        r["setup_and_starts"] = round((r["params"].get("setup_seconds") or 0) + steps.get("starts", 0.0), 2)
        print(f"growth 512x{C} at {limit:g} s: wall {r['wall']:.1f} s ({r['over']:+.1f}), setup + starts "
              f"{r['setup_and_starts']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, objective {r['objective']:.3f}, "
              f"gap {100 * r['gap']:.2f}%", flush=True)
        first = first or r
        tag = f"512 x {C}, {limit:g} s"
        rows.append(row(f"{tag}: peak RSS (GiB), vs C = {classes[0]}", r["peak_rss_gib"], first["peak_rss_gib"]))
        rows.append(row(f"{tag}: setup + starts (s), vs C = {classes[0]}", r["setup_and_starts"],
                        first["setup_and_starts"], f"< {0.25 * limit:g} (a quarter of the limit)",
                        r["setup_and_starts"] < 0.25 * limit))
        rows.append(row(f"{tag}: seconds past the limit", r["over"], None, f"<= {over_target(limit):g}",
                        r["over"] <= over_target(limit)))
    return rows, runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and 10-20 s limits (shows the script works)")
    ap.add_argument("--parts", default="cub,imagenet,growth", help="cub, imagenet, growth, licence")
    ap.add_argument("--done-when", action="store_true",
                    help="issue 31's rows: imagenet 512x1000 at 300 and 600 s, 2048x1000 at 300 s, and cub "
                         "(60 and 300 s, work-limited) without plain CP-SAT")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--long", type=float, default=300.0, help="the longer time limit (0: skip)")
    ap.add_argument("--problem", default=None, help="run directory or .npz with A and R (default: synthetic)")
    ap.add_argument("--compare-commit", default=None, help="also run the qpm solver of this git revision")
    ap.add_argument("--bound", default="auto", choices=("lp", "sdp", "auto"),
                    help="the qpm selector's bound source (as qpm select --bound); the licence part uses its own")
    ap.add_argument("--skip-plain", action="store_true", help="no plain CP-SAT rows")
    ap.add_argument("--skip-ours", action="store_true", help="no qpm rows (e.g. plain CP-SAT rows alone)")
    ap.add_argument("--no-ils-growth", action="store_true",
                    help="qpm rows: a fixed number of local-search rounds per cycle (solve(ils_growth=False))")
    ap.add_argument("--ils-rounds", type=int, default=0, help="qpm rows: local-search rounds per cycle (solve's "
                                                               "ils_rounds; 0: its default)")
    ap.add_argument("--start-rounds", type=int, default=-1, help="qpm rows: iterated-search rounds from each start "
                                                                  "(solve's start_rounds; -1: its default)")
    ap.add_argument("--sizes", default="512x1000,2048x1000", help="imagenet: n_features x classes, comma separated")
    ap.add_argument("--limits", default="60,300,600", help="imagenet: time limits (s)")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "qpm-bench-selection"),
                    help="where the synthetic problem files are kept between runs")
    ap.add_argument("--growth-limit", type=float, default=60.0)
    ap.add_argument("--growth-classes", default="200,400,600,800,1000")
    ap.add_argument("--licence-limits", default="5,15,60")
    ap.add_argument("--gurobi-limit", type=float, default=60.0)
    ap.add_argument("--instances", type=int, default=42)
    ap.add_argument("--oracle", default=None, help="JSON of Gurobi's results: read if present (instances in it are "
                                                   "not solved again), else written")
    args = ap.parse_args()
    parts = ["cub", "imagenet"] if args.done_when else [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.done_when:
        args.skip_plain, args.time_limit, args.long = True, 60.0, 300.0
    result: dict = {"benchmark": "selection", "rows": [], "runs": {}}
    for part in parts:
        if part == "licence":
            lic = run_licence(args)
            result["runs"]["licence"] = lic
            result["rows"] += lic.pop("summary_rows")
            continue
        rows, runs = {"cub": run_cub, "imagenet": run_imagenet, "growth": run_growth}[part](args)
        result["rows"] += rows
        result["runs"][part] = runs
    result["notes"] = (f"parts {', '.join(parts)}; {args.workers} CP-SAT workers on {os.cpu_count()} cpus (objective "
                       f"and gap at a time limit depend on the load, which each run records; work-limited rows, "
                       f"memory and seconds past the limit less so)")
    for r in result["rows"]:
        print(json.dumps(r, default=float), flush=True)
    # numpy scalars in the solver's stats become numbers here (the harness would write them as text)
    write_result(args.json_out, json.loads(json.dumps(result, default=float)), started=STARTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
