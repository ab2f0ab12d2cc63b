"""CP-SAT on the selection problem: one model solved in chunks that share it and its lazy distinct-set cuts
(:class:`CpsatModel`: exact, restricted to the top-M candidates, or relaxed), and CP-SAT alone (:func:`cpsat_solve`,
the plain-model baseline)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from qpm_plugins.selectors.qpm.instance import QpmInstance, assign, candidates


def exact_model_fits(inst: QpmInstance) -> bool:
    """Whether CP-SAT gets the exact model (every feature a candidate of every class) instead of the top-M
    restriction: the licence-sized problems (n <= 64) and anything up to 4,000 (feature, class) entries."""
    return inst.n <= 64 or inst.n * inst.C <= 4000


@dataclass
class CpsatResult:
    selection: np.ndarray | None  # best S found by CP-SAT (sorted) or None
    assignment: np.ndarray | None  # its W [C, K] from the model, when every class used candidates only
    bound: float  # valid upper bound on the original problem (inf if none)
    status: str
    wall: float
    rounds: int


class _Progress:
    """CP-SAT solution callback: forwards (objective, bound) to a progress function."""

    def __init__(self, scale: float, report) -> None:
        from ortools.sat.python import cp_model

        class _CB(cp_model.CpSolverSolutionCallback):
            def on_solution_callback(cb) -> None:  # noqa: N805 - ortools naming
                report(cb.ObjectiveValue() / scale, cb.BestObjectiveBound() / scale)

        self.cb = _CB()


def _scale(inst: QpmInstance) -> float:
    """Integer scale for CP-SAT: the largest coefficient becomes 1e8, so the rounding slack of the bound stays
    around 1e-7 of the objective, well inside :data:`OPT_TOL`."""
    m = max(float(np.abs(inst.coef).max(initial=0)), float(np.abs(inst.pair_w).max(initial=0)),
            float(np.abs(inst.bonus).max(initial=0)), 1e-12)
    return 1e8 / m


class CpsatModel:
    """One CP-SAT model of the problem, solved in chunks that share the model and its lazy duplicate cuts.

    ``mode="full"``: the plain model of METHOD §6.5 (every feature a candidate of every class, every penalised pair);
    exact, so its bound is valid and a chunk that ends OPTIMAL with distinct sets proves the optimum.
    ``mode="restrict"``: class c may only use its top-M features (plus the hint's): a restriction, good for finding
    solutions near the incumbent; its bound is not valid for the original problem and is not reported.
    ``mode="relax"``: top-M plus a fallback slot worth the (M+1)-th value and penalties only among candidates: a
    relaxation whose bound is valid.
    Distinct class sets are lazy: after each chunk, classes whose sets coincide get a constraint that their rows
    differ (over the first class's candidates). Without all of them the model is a relaxation, so bounds stay valid.
    """

    def __init__(self, inst: QpmInstance, M: int, mode: str = "restrict", hint: np.ndarray | None = None) -> None:
        from ortools.sat.python import cp_model

        self.inst, self.mode = inst, mode
        n, C, k, K = inst.n, inst.C, inst.k, inst.K
        M = n if mode == "full" else min(M, n)
        cand = [set(row.tolist()) for row in candidates(inst, M)]
        if hint is not None and mode == "restrict":
            Sh = np.sort(np.asarray(hint))
            Wh = assign(inst, Sh)
            for c in range(C):
                cand[c] |= set(Sh[Wh[c]].tolist())
        use_fallback = mode == "relax" and M < n
        self.Q = Q = _scale(inst)
        order_vals = -np.sort(-inst.coef, axis=0)
        model = cp_model.CpModel()
        s = [model.NewBoolVar(f"s{f}") for f in range(n)]
        model.Add(sum(s) == K)
        terms: list[tuple[Any, int]] = []
        x: list[dict[int, Any]] = []
        z: list[Any] = []
        for c in range(C):
            xc = {}
            for f in sorted(cand[c]):
                v = model.NewBoolVar("")
                model.AddImplication(v, s[f])
                xc[f] = v
                terms.append((v, int(round(inst.coef[f, c] * Q))))
            x.append(xc)
            if use_fallback:
                zc = model.NewIntVar(0, k, "")
                terms.append((zc, int(round(order_vals[M, c] * Q))))
                model.Add(sum(xc.values()) + zc == k)
                z.append(zc)
            else:
                model.Add(sum(xc.values()) == k)
                z.append(None)
        relevant = np.zeros(n, dtype=bool)
        for c in range(C):
            relevant[list(cand[c])] = True
        if mode != "relax":
            relevant[:] = True
        ys: list[tuple[int, int, Any]] = []
        for (f, g), w in zip(inst.pairs, inst.pair_w, strict=True):
            if not (relevant[f] and relevant[g]):
                continue  # only in "relax": dropping a penalty relaxes the model, the bound stays valid
            y = model.NewBoolVar("")
            model.AddBoolOr([s[int(f)].Not(), s[int(g)].Not(), y])  # y >= s_f + s_g - 1
            terms.append((y, -int(round(w * Q))))
            ys.append((int(f), int(g), y))
        for f in range(n):
            if inst.bonus[f] != 0:
                terms.append((s[f], int(round(inst.bonus[f] * Q))))
        model.Maximize(sum(c * v for v, c in terms if c != 0))
        # rounding to integers moves the objective by at most 0.5 per active term
        self.slack = 0.5 * (C * k + len(ys) + K + (C * k if use_fallback else 0)) / Q
        self.bound_valid = mode != "restrict"
        self.model, self.s, self.x, self.z, self.ys = model, s, x, z, ys
        self.cut_pairs: set[tuple[int, int]] = set()
        self.bound = math.inf
        self.proven = False
        self.status = "UNKNOWN"
        self.chunks = 0

    def set_hint(self, S: np.ndarray) -> None:
        inst, model = self.inst, self.model
        model.ClearHints()
        inS = np.zeros(inst.n, dtype=bool)
        inS[S] = True
        Ssorted = np.sort(S)
        W = assign(inst, Ssorted)
        for f in range(inst.n):
            model.AddHint(self.s[f], bool(inS[f]))
        for c in range(inst.C):
            chosen = set(Ssorted[W[c]].tolist())
            for f, v in self.x[c].items():
                model.AddHint(v, f in chosen)
            if self.z[c] is not None:
                model.AddHint(self.z[c], sum(1 for f in chosen if f not in self.x[c]))
        for f, g, y in self.ys:
            model.AddHint(y, bool(inS[f] and inS[g]))

    def chunk(self, hint: np.ndarray | None, *, dtime: float | None, deadline: float, workers: int, seed: int,
              deterministic: bool = True, report=None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One solve (``dtime`` deterministic seconds, never past ``deadline``) from the hint; returns the selection
        of its best solution and that solution's W when it is complete (distinct sets, no fallback), else None.
        Updates ``bound`` (valid models only), ``proven`` and the lazy cuts."""
        from ortools.sat.python import cp_model

        inst, C = self.inst, self.inst.C
        remaining = deadline - time.perf_counter()
        if remaining <= 0.05 or self.proven:
            return None, None
        if hint is not None:
            self.set_hint(np.asarray(hint))
        solver = cp_model.CpSolver()
        p = solver.parameters
        p.num_workers = max(1, int(workers))
        p.random_seed = int(seed)
        p.max_time_in_seconds = float(remaining)
        if deterministic:
            p.interleave_search = True
        if dtime:
            p.max_deterministic_time = float(dtime)
        cb = _Progress(self.Q, report).cb if report is not None else None
        status = solver.Solve(self.model, cb) if cb is not None else solver.Solve(self.model)
        self.chunks += 1
        self.status = solver.StatusName(status)
        if status == cp_model.INFEASIBLE and self.bound_valid:
            self.bound = -math.inf
            return None, None
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None, None
        if self.bound_valid:
            self.bound = min(self.bound, solver.BestObjectiveBound() / self.Q + self.slack)
        x, z = self.x, self.z
        S_new = np.flatnonzero([solver.BooleanValue(v) for v in self.s])
        pos = {int(f): j for j, f in enumerate(S_new)}
        W = np.zeros((C, len(S_new)), dtype=bool)
        for c in range(C):
            for f, v in x[c].items():
                if solver.BooleanValue(v):
                    W[c, pos[f]] = True
        fallback_used = any(zc is not None and solver.Value(zc) > 0 for zc in z)
        rows: dict[tuple, list[int]] = {}
        for c in range(C):
            if z[c] is not None and solver.Value(z[c]) > 0:
                continue
            key = tuple(sorted(f for f, v in x[c].items() if solver.BooleanValue(v)))
            rows.setdefault(key, []).append(c)
        new_pairs = [(g[0], c2) for g in rows.values() if len(g) > 1 for c2 in g[1:]]
        new_pairs = [pr for pr in new_pairs if pr not in self.cut_pairs]
        if status == cp_model.OPTIMAL and not new_pairs and self.mode == "full":
            self.proven = True  # optimal for the exact model and its solution has distinct sets
        for c1, c2 in new_pairs:
            self._differ(c1, c2)
        complete = not fallback_used and not new_pairs and _distinct_rows(W) and (W.sum(1) == inst.k).all()
        return S_new, (W if complete else None)

    def add_packing(self, U: tuple[int, ...], gamma: list[int], rhs: int) -> None:
        """A distinct-set cut (:func:`packing_cuts`; valid for every feasible solution) for CP-SAT's LP."""
        terms = [self.x[c][f] for c in gamma for f in U if f in self.x[c]]
        if terms:
            self.model.Add(sum(terms) <= rhs)

    def _differ(self, c1: int, c2: int) -> None:
        model, x, z = self.model, self.x, self.z
        self.cut_pairs.add((c1, c2))
        diff = []
        for f, v1 in x[c1].items():
            d = model.NewBoolVar("")
            model.AddImplication(d, v1)
            v2 = x[c2].get(f)
            if v2 is not None:
                model.AddImplication(d, v2.Not())
            diff.append(d)
        escape = []
        for c in (c1, c2):
            if z[c] is not None:
                u = model.NewBoolVar("")
                model.Add(z[c] >= 1).OnlyEnforceIf(u)
                model.Add(z[c] == 0).OnlyEnforceIf(u.Not())
                escape.append(u)
        model.AddBoolOr(diff + escape)


def cpsat_solve(inst: QpmInstance, M: int, hint: np.ndarray | None, time_limit: float, *, workers: int = 8,
                seed: int = 0, deterministic: bool = True, report=None, max_rounds: int = 20,
                mode: str = "restrict", dtime: float | None = None) -> CpsatResult:
    """CP-SAT alone on one :class:`CpsatModel` (the plain-model baseline of ``benchmarks/bench_selection.py``):
    solve, add the duplicate cuts its solution needs, solve again, until a chunk proves the optimum, the time runs
    out or ``max_rounds`` chunks ran."""
    start = time.perf_counter()
    deadline = start + time_limit
    cp = CpsatModel(inst, M, mode, hint)
    best_S = best_W = None
    h = hint
    while cp.chunks < max_rounds and time.perf_counter() < deadline - 0.2 and not cp.proven:
        S, W = cp.chunk(h, dtime=dtime, deadline=deadline, workers=workers, seed=seed, deterministic=deterministic,
                        report=report)
        if S is None:
            break
        best_S, best_W, h = S, W, S
        if cp.status != "OPTIMAL":
            break
    return CpsatResult(selection=best_S, assignment=best_W, bound=cp.bound, status=cp.status,
                       wall=time.perf_counter() - start, rounds=cp.chunks)


def _distinct_rows(W: np.ndarray) -> bool:
    return len({bytes(np.packbits(r)) for r in W}) == len(W)
