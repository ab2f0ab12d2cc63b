"""The ``qpm`` selector: QPM's feature selection and assignment (METHOD.md §6.5) on OR-Tools CP-SAT, license-free.

Problem: choose a set S of K features and for every class c a set F_c of exactly k features of S, no two classes with
the same set, maximising

    Z = 1000/(k C) * sum_c sum_{f in F_c} A[f, c]  -  sum_{disallowed f<g in S} Rt[f, g]  (+ sum_{f in S} B[f])

How we solve it (see ``solve``):
1. For a fixed S each class simply takes its top-k A-values in S (up to duplicate sets), so the search is over S only:
   greedy, clique and two seeded random starts, then best-improvement swap local search with perturbations (kicks
   of 4..16 random swaps, cycled; a budget counted in rounds, so deterministic), all vectorised in numpy.
   Duplicate class sets are repaired afterwards at minimal loss (``assign``; exact linear assignment when needed).
2. An honest upper bound: the LP relaxation (GLOP) of a *relaxed* model in which class c keeps only its top-M
   candidates plus an unconstrained "fallback" slot worth the (M+1)-th best value, with McCormick pair penalties,
   tightened by rounds of clique cuts on the penalty (``lp_bound``; exact least clique penalties, convexified).
   Every relaxation step only raises the optimum. On CUB-sized instances the gain part of this LP is within 0.2 %
   of the best selection; the gap that remains is the redundancy penalty (benchmarks/results/selection.md).
3. CP-SAT hinted with the incumbent: on small problems the exact model (its bound is valid and it proves optimality,
   duplicate sets forbidden lazily); on large ones the top-M restriction, which searches near the incumbent. Every
   solution it finds is mapped back to S and re-assigned exactly, so only truly feasible solutions are reported.
The reported gap is (bound - objective) / |objective| with the smallest valid bound.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qpmcli.contracts import Selection, SelectionProblem


# ------------------------------------------------------------------------------------------------------ instance
@dataclass
class QpmInstance:
    """The objective of one request: scaled class values, pair penalties, optional linear feature bonus."""

    coef: np.ndarray  # [n, C]: 1000/(kC) * A
    pairs: np.ndarray  # [P, 2] disallowed pairs f < g
    pair_w: np.ndarray  # [P] penalty weights
    bonus: np.ndarray  # [n] (B term; zeros when unused)
    K: int
    k: int
    threshold: float = math.inf
    clique: list[int] = field(default_factory=list)
    P: np.ndarray = field(init=False)  # dense symmetric penalty matrix [n, n]

    def __post_init__(self) -> None:
        n = self.coef.shape[0]
        self.P = np.zeros((n, n))
        if len(self.pairs):
            self.P[self.pairs[:, 0], self.pairs[:, 1]] = self.pair_w
            self.P[self.pairs[:, 1], self.pairs[:, 0]] = self.pair_w

    @property
    def n(self) -> int:
        return int(self.coef.shape[0])

    @property
    def C(self) -> int:
        return int(self.coef.shape[1])

    def selection_value(self, S: np.ndarray) -> float:
        """Z for selection S when every class takes its top-k in S (duplicates ignored: an upper bound for S)."""
        sub = self.coef[S]
        top = -np.partition(-sub, self.k - 1, axis=0)[: self.k]
        return float(top.sum() - 0.5 * self.P[np.ix_(S, S)].sum() + self.bonus[S].sum())

    def value(self, S: np.ndarray, W: np.ndarray) -> float:
        """Z of a full solution: S sorted [K], W [C, K] binary."""
        S = np.asarray(S)
        gain = float((self.coef[S].T * W).sum())
        return gain - 0.5 * float(self.P[np.ix_(S, S)].sum()) + float(self.bonus[S].sum())


def make_instance(problem: SelectionProblem, K: int, k: int) -> QpmInstance:
    """Scale A (METHOD §6.5), find the clique threshold and the penalised pairs (§6.4) for this K."""
    from qpmcli.selection import clique_threshold, disallowed_pairs

    A = np.asarray(problem.A, dtype=np.float64)
    C = A.shape[1]
    thr = clique_threshold(problem.R, K)
    pairs, w = disallowed_pairs(problem.R, thr.threshold)
    bonus = np.zeros(A.shape[0]) if problem.B is None else np.asarray(problem.B, dtype=np.float64).ravel()
    return QpmInstance(coef=A * (1000.0 / (k * C)), pairs=pairs, pair_w=w, bonus=bonus, K=K, k=k,
                       threshold=float(thr.threshold), clique=list(thr.clique))


# ------------------------------------------------------------------------------------------ assignment for fixed S
def assign(inst: QpmInstance, S: np.ndarray) -> np.ndarray:
    """Best-effort optimal W [C, K] for the sorted selection S: each class's top-k, then duplicate sets repaired.

    Repair: within a group of classes sharing a set, the class that would lose most by moving keeps it; the others
    take their cheapest single swap (one feature out, one feature of S in) to a set no class uses yet.
    """
    S = np.asarray(S)
    sub = inst.coef[S].T  # [C, K]
    C, K = sub.shape
    k = inst.k
    order = np.argsort(-sub, axis=1, kind="stable")
    W = np.zeros((C, K), dtype=bool)
    W[np.arange(C)[:, None], order[:, :k]] = True
    if C == 1:
        return W
    for _ in range(min(C, 50)):
        keys = [bytes(np.packbits(r)) for r in W]
        groups: dict[bytes, list[int]] = {}
        for c, key in enumerate(keys):
            groups.setdefault(key, []).append(c)
        dups = [g for g in groups.values() if len(g) > 1]
        if not dups:
            return W
        used = set(keys)
        for group in dups:
            moves = []
            for c in group:
                moves.append((_cheapest_swap(sub[c], W[c], used), c))
            # the class whose best alternative is most expensive stays; the rest move (cheapest first)
            moves.sort(key=lambda m: (m[0][0], m[1]))
            for (_, out_j, _), c in moves[:-1]:
                if out_j < 0:
                    continue
                alt = _cheapest_swap(sub[c], W[c], used)  # recheck: earlier moves may have used its target
                if alt[1] < 0:
                    continue
                W[c, alt[1]] = False
                W[c, alt[2]] = True
                used.add(bytes(np.packbits(W[c])))
    return _exact_assignment(sub, k)


def _exact_assignment(sub: np.ndarray, k: int) -> np.ndarray:
    """Optimal distinct assignment for a fixed selection by linear assignment over all k-subsets (small K only).

    Used when single swaps cannot untangle the duplicates (e.g. almost as many classes as k-subsets).
    """
    from scipy.optimize import linear_sum_assignment

    from qpmcli.errors import SelectionError

    C, K = sub.shape
    if math.comb(K, k) > 20_000:
        raise SelectionError(f"could not give {C} classes distinct feature sets from {K} features; "
                             f"raise --features or lower --per-class")
    subsets = np.array(list(itertools.combinations(range(K), k)))
    value = sub[:, subsets].sum(2)  # [C, n_subsets]
    rows, cols = linear_sum_assignment(-value)
    W = np.zeros((C, K), dtype=bool)
    for c, j in zip(rows, cols, strict=True):
        W[c, subsets[j]] = True
    return W


def _cheapest_swap(values: np.ndarray, row: np.ndarray, used: set[bytes]) -> tuple[float, int, int]:
    """(loss, out, in) of the cheapest one-feature swap of ``row`` to a set not in ``used``; (inf, -1, -1) if none."""
    ins = np.flatnonzero(row)
    outs = np.flatnonzero(~row)
    if len(outs) == 0:
        return (math.inf, -1, -1)
    cost = values[ins][:, None] - values[outs][None, :]
    for flat in np.argsort(cost, axis=None, kind="stable"):
        i, j = divmod(int(flat), len(outs))
        cand = row.copy()
        cand[ins[i]] = False
        cand[outs[j]] = True
        if bytes(np.packbits(cand)) not in used:
            return (float(cost[i, j]), int(ins[i]), int(outs[j]))
    return (math.inf, -1, -1)


# ------------------------------------------------------------------------------------------------- heuristics
def greedy(inst: QpmInstance, exclude_dead: bool = True) -> np.ndarray:
    """Forward greedy: repeatedly add the feature with the largest gain in top-k value minus penalty."""
    n, C, k = inst.n, inst.C, inst.k
    chosen: list[int] = []
    avail = np.ones(n, dtype=bool)
    if exclude_dead and (np.abs(inst.coef).sum(1) > 0).sum() >= inst.K:
        avail &= np.abs(inst.coef).sum(1) > 0
    top = np.full((k, C), -np.inf)  # current top-k values per class (sorted descending down the rows)
    pen = np.zeros(n)
    for _ in range(inst.K):
        kth = top[-1]
        base = np.where(np.isfinite(kth), kth, -np.inf)
        if np.isfinite(kth).all():
            gain = np.maximum(inst.coef - base, 0.0).sum(1)
        else:  # fewer than k chosen: every new feature is taken by every class
            gain = inst.coef.sum(1)
        score = gain - pen + inst.bonus
        score[~avail] = -np.inf
        f = int(np.argmax(score))
        chosen.append(f)
        avail[f] = False
        pen += inst.P[f]
        top = -np.sort(-np.vstack([top, inst.coef[f][None]]), axis=0)[:k]
    return np.sort(np.array(chosen))


def local_search(inst: QpmInstance, S: np.ndarray, max_moves: int = 10_000, deadline: float = math.inf) -> np.ndarray:
    """Best-improvement 1-swap local search on the selection (duplicates ignored; repaired by :func:`assign`).

    For a swap (f out, g in), a class using f loses A[f] and gets its (k+1)-th best; every class gains
    max(0, A[g] - new k-th best). All K x (n-K) swaps are scored at once.
    """
    S = np.sort(np.asarray(S)).copy()
    n, k, K = inst.n, inst.k, inst.K
    if K <= k or K >= n:
        return S
    for _ in range(max_moves):
        if time.perf_counter() > deadline:
            break
        inS = np.zeros(n, dtype=bool)
        inS[S] = True
        G = np.flatnonzero(~inS)
        sub = inst.coef[S]  # [K, C]
        part = -np.sort(-sub, axis=0)
        kth, k1 = part[k - 1], part[k]  # k-th and (k+1)-th best values in S per class
        # exact top-k membership, ties broken by row order
        rank = np.argsort(np.argsort(-sub, axis=0, kind="stable"), axis=0, kind="stable")
        in_top = rank < k
        loss = np.where(in_top, sub - k1, 0.0).sum(1)  # [K]
        newkth = np.where(in_top, k1, kth)  # [K, C]
        cg = inst.coef[G]  # [G, C]
        gain = np.empty((K, len(G)))
        for i in range(K):
            gain[i] = np.maximum(cg - newkth[i], 0.0).sum(1)
        pen_S = inst.P[np.ix_(S, S)].sum(1)  # [K]
        pen_G = inst.P[np.ix_(G, S)]  # [G, K]
        pen_add = pen_G.sum(1)[None, :] - pen_G.T  # [K, G]: penalty g gets with S \ {S_i}
        delta = gain - loss[:, None] + pen_S[:, None] - pen_add + inst.bonus[G][None, :] - inst.bonus[S][:, None]
        i, j = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if delta[i, j] <= 1e-9:
            break
        S[i] = G[j]
        S.sort()
    return S


def iterated_local_search(inst: QpmInstance, S: np.ndarray, rng: np.random.Generator, rounds: int,
                          deadline: float, kicks: tuple[int, ...] = (4, 8, 12, 16)) -> tuple[np.ndarray, float]:
    """Perturb (random swaps), re-optimise, keep if better; deterministic for a given rng and rounds.

    The kick size cycles through ``kicks`` (capped at K // 3 and the number of unselected features): small kicks
    polish, large ones leave the basin. On the CUB-sized benchmark kicks of 3 stalled at 332.4 while cycling
    4..16 reaches 334.8 in about a hundred rounds (benchmarks/results/selection.md).
    """
    best = local_search(inst, S, deadline=deadline)
    best_v = inst.selection_value(best)
    cap = max(1, min(inst.K // 3, inst.n - inst.K))
    sizes = sorted({max(1, min(int(kk), cap)) for kk in kicks}) or [1]
    for r in range(rounds):
        if time.perf_counter() > deadline:
            break
        kick = sizes[r % len(sizes)]
        cur = best.copy()
        inS = np.zeros(inst.n, dtype=bool)
        inS[cur] = True
        outs = rng.choice(inst.K, size=min(kick, inst.K), replace=False)
        pool = np.flatnonzero(~inS)
        ins = rng.choice(pool, size=min(kick, len(pool)), replace=False)
        cur[outs[: len(ins)]] = ins
        cur = local_search(inst, np.sort(cur), deadline=deadline)
        v = inst.selection_value(cur)
        if v > best_v + 1e-9:
            best, best_v = cur, v
    return best, best_v


# ------------------------------------------------------------------------------------------------------ bounds
def candidates(inst: QpmInstance, M: int) -> np.ndarray:
    """Per class the indices of its top-M features by value, [C, M] (M = n: no pruning)."""
    M = min(M, inst.n)
    return np.argsort(-inst.coef, axis=0, kind="stable")[:M].T


def lp_bound(inst: QpmInstance, M: int, penalty: bool = True, *, cut_rounds: int = 0,
             deadline: float = math.inf, report=None) -> float:
    """Upper bound from the LP relaxation of the pruned model (fallback slot per class, McCormick pair penalties),
    optionally tightened by rounds of clique cuts on the penalty.

    Valid because every feasible solution maps to a feasible LP point of at least the same value: a class's features
    outside its top-M are worth at most the (M+1)-th best value, which the fallback slot pays without needing s;
    penalties between features that are no class's candidate are dropped (which only raises the optimum).
    Clique cut: for features T that are pairwise disallowed, m = |S & T| selected ones pay at least phi(m), the convex
    envelope of the least penalty of m members of T (:func:`clique_penalty_floor`), so for every j the secant
    sum_{pairs in T} w y >= phi(j) + (phi(j+1) - phi(j)) (sum_T s - j) holds for every solution. These are the cuts the
    McCormick LP needs: it likes to take redundant features half each, paying no penalty.
    """
    from ortools.linear_solver import pywraplp

    n, C, k, K = inst.n, inst.C, inst.k, inst.K
    M = min(M, n)
    cand = candidates(inst, M)
    solver = pywraplp.Solver.CreateSolver("GLOP")
    s = [solver.NumVar(0.0, 1.0, "") for _ in range(n)]
    solver.Add(solver.Sum(s) == K)
    obj = solver.Objective()
    for f in range(n):
        if inst.bonus[f] != 0:
            obj.SetCoefficient(s[f], float(inst.bonus[f]))
    order_vals = -np.sort(-inst.coef, axis=0)
    for c in range(C):
        xs = []
        for f in cand[c]:
            x = solver.NumVar(0.0, 1.0, "")
            solver.Add(x <= s[f])
            obj.SetCoefficient(x, float(inst.coef[f, c]))
            xs.append(x)
        if M < n:
            z = solver.NumVar(0.0, float(k), "")
            obj.SetCoefficient(z, float(order_vals[M, c]))
            xs.append(z)
        solver.Add(solver.Sum(xs) == k)
    relevant = np.zeros(n, dtype=bool)
    relevant[np.unique(cand)] = True
    Y: dict[tuple[int, int], Any] = {}
    if penalty:
        for (f, g), w in zip(inst.pairs, inst.pair_w, strict=True):
            if relevant[f] and relevant[g]:  # other pairs dropped: a relaxation, still an upper bound
                y = solver.NumVar(0.0, 1.0, "")
                solver.Add(y >= s[int(f)] + s[int(g)] - 1)
                obj.SetCoefficient(y, -float(w))
                Y[(int(f), int(g))] = y
    obj.SetMaximization()
    best = math.inf
    for rnd in range(cut_rounds + 1):
        remaining = deadline - time.perf_counter()
        if rnd > 0 and remaining <= 1.0:
            break
        if math.isfinite(remaining):
            solver.SetTimeLimit(int(max(remaining, 1.0) * 1000))
        status = solver.Solve()
        if status != pywraplp.Solver.OPTIMAL:
            break  # an unfinished LP proves nothing; keep the last bound
        # GLOP works in floating point: pad by its tolerance so the bound stays on the safe side
        best = min(best, float(obj.Value()) + 1e-6 * max(1.0, abs(obj.Value())))
        if report is not None:
            report(best)
        if rnd == cut_rounds or not Y:
            break
        sv = np.array([v.solution_value() for v in s])
        yv = {p: v.solution_value() for p, v in Y.items()}
        if _add_clique_cuts(inst, solver, s, Y, sv, yv, relevant) == 0:
            break
    return best


def _subset_penalties(T: list[int], P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penalty and size of every subset of T, indexed by bit mask (bit i = T[i]); the subsets of the first i members
    are exactly the masks below 2^i."""
    pen = np.zeros(1)
    cnt = np.zeros(1, dtype=np.int64)
    for i in range(len(T)):  # subsets of the first i+1 members = those of the first i, without and with member i
        add = ((np.arange(2 ** i)[:, None] >> np.arange(i)[None, :]) & 1) @ P[T[i], T[:i]] if i else np.zeros(1)
        pen = np.concatenate([pen, pen + add])
        cnt = np.concatenate([cnt, cnt + 1])
    return pen, cnt


def clique_penalty_floor(T: list[int], P: np.ndarray, _subsets: tuple[np.ndarray, np.ndarray] | None = None
                         ) -> np.ndarray:
    """phi[m] for m = 0..|T|: a convex lower bound on the penalty that any m selected members of T pay.

    The exact least penalty of an m-subset comes from enumerating all 2^|T| subsets (|T| <= 16); phi is its lower
    convex envelope, so every secant of phi is a valid inequality at every integer m. ``_subsets``: the enumeration
    of a longer list that starts with T (its masks below 2^|T| are T's subsets).
    """
    L = len(T)
    pen, cnt = _subset_penalties(T, P) if _subsets is None else (_subsets[0][: 2 ** L], _subsets[1][: 2 ** L])
    least = np.full(L + 1, np.inf)
    np.minimum.at(least, cnt, pen)
    hull: list[int] = []
    for m in range(L + 1):  # lower convex hull of the points (m, least[m])
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (least[b] - least[a]) * (m - a) >= (least[m] - least[a]) * (b - a) - 1e-12:
                hull.pop()
            else:
                break
        hull.append(m)
    return np.interp(np.arange(L + 1), hull, least[hull])


_MAX_CLIQUE = 14


def _add_clique_cuts(inst: QpmInstance, solver, s, Y, sv: np.ndarray, yv: dict, relevant: np.ndarray) -> int:
    """Greedy separation of clique cuts; adds the most violated cut per seed feature, returns how many were added.

    Around every feature with s > 0.01 (largest first) a clique of disallowed pairs is grown greedily by s. For each
    prefix T of that clique and each j, phi(j) + (phi(j+1) - phi(j)) (sum_T s - j) <= sum_{pairs in T} w y is a valid
    cut (:func:`clique_penalty_floor`); the most violated one is added. Exact phi (instead of the sum of the smallest
    pair weights) and all prefixes lowered the saturated bound by 0.4-1.4 units on the benchmark instances.
    """
    P = inst.P
    Ym = np.zeros_like(P)
    for (f, g), val in yv.items():
        Ym[f, g] = Ym[g, f] = val
    PY = P * Ym
    D = P > 0
    live = relevant & (sv > 1e-6)
    seen: set[tuple[int, ...]] = set()
    added = 0
    for f0 in (int(f) for f in np.argsort(-sv, kind="stable") if sv[f] > 0.01 and relevant[f]):
        T = [f0]
        ok = D[f0] & live
        while len(T) < _MAX_CLIQUE and ok.any():
            g = int(np.argmax(np.where(ok, sv, -np.inf)))
            T.append(g)
            ok &= D[g]
            ok[g] = False
        if len(T) < 2:
            continue
        subsets = _subset_penalties(T, P)
        cuts: list[tuple[float, tuple[int, ...], list[int], float, float]] = []
        for i in range(2, len(T) + 1):
            Ti = T[:i]
            key = tuple(sorted(Ti))
            if key in seen:
                continue
            ssum = float(sv[Ti].sum())
            lhs = 0.5 * float(PY[np.ix_(Ti, Ti)].sum())
            phi = clique_penalty_floor(Ti, P, subsets)
            for j in range(1, i):
                slope = phi[j + 1] - phi[j]
                viol = phi[j] + slope * (ssum - j) - lhs
                if slope > 1e-12 and viol > 1e-6:
                    cuts.append((viol, key, Ti, float(phi[j] - slope * j), float(slope)))
        if not cuts:
            continue
        # every violated secant of the whole clique (as many as possible early on) and the most violated prefix cut
        full = tuple(sorted(T))
        chosen = [c for c in cuts if c[1] == full]
        best = max(cuts, key=lambda c: c[0])
        if best[1] != full:
            chosen.append(best)
        for _, key, Ti, a, b in chosen:
            pairs = [(min(x, y), max(x, y)) for i, x in enumerate(Ti) for y in Ti[i + 1:]]
            if not all(p in Y for p in pairs):
                continue
            seen.add(key)
            lhs = solver.Sum([float(P[x, y]) * Y[(x, y)] for x, y in pairs])
            solver.Add(lhs >= a + b * solver.Sum([s[f] for f in Ti]))
            added += 1
    return added


# ----------------------------------------------------------------------------------------------------- CP-SAT
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
    """Integer scale for CP-SAT: the largest coefficient becomes about 1e7 (rounding slack ~1e-7 relative)."""
    m = max(float(np.abs(inst.coef).max(initial=0)), float(np.abs(inst.pair_w).max(initial=0)),
            float(np.abs(inst.bonus).max(initial=0)), 1e-12)
    return 1e7 / m


def cpsat_solve(inst: QpmInstance, M: int, hint: np.ndarray | None, time_limit: float, *, workers: int = 8,
                seed: int = 0, deterministic: bool = True, report=None, max_rounds: int = 20,
                mode: str = "restrict", dtime: float | None = None) -> CpsatResult:
    """CP-SAT with lazy duplicate cuts on one of three models of the problem.

    ``mode="full"``: the plain model of METHOD §6.5 (every feature a candidate of every class, every penalised pair);
    exact, so its bound is valid (the baseline of ``benchmarks/bench_selection.py``, and our model on tiny problems).
    ``mode="restrict"``: class c may only use its top-M features (plus the hint's): a restriction, good for finding
    solutions fast; its bound is not valid for the original problem and is not reported.
    ``mode="relax"``: top-M plus a fallback slot worth the (M+1)-th value and penalties only among candidates: a
    relaxation whose bound is valid.
    With ``deterministic``, CP-SAT interleaves its workers deterministically and stops after ``dtime`` deterministic
    seconds (a work measure), so the result does not depend on the machine unless the wall-clock limit hits first.
    """
    from ortools.sat.python import cp_model

    start = time.perf_counter()
    n, C, k, K = inst.n, inst.C, inst.k, inst.K
    M = n if mode == "full" else min(M, n)
    cand = [set(row.tolist()) for row in candidates(inst, M)]
    hint_sets: list[set[int]] | None = None
    if hint is not None:
        Sh = np.sort(np.asarray(hint))
        Wh = assign(inst, Sh)
        hint_sets = [set(Sh[Wh[c]].tolist()) for c in range(C)]
        if mode == "restrict":
            for c in range(C):
                cand[c] |= hint_sets[c]
    use_fallback = mode == "relax" and M < n
    Q = _scale(inst)
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
    n_pen = len(ys)
    for f in range(n):
        if inst.bonus[f] != 0:
            terms.append((s[f], int(round(inst.bonus[f] * Q))))
    model.Maximize(sum(c * v for v, c in terms if c != 0))
    # rounding to integers moves the objective by at most 0.5 per active term
    slack = 0.5 * (C * k + n_pen + K + (C * k if use_fallback else 0)) / Q
    bound_valid = mode != "restrict"

    def set_hint(S: np.ndarray) -> None:
        model.ClearHints()
        inS = np.zeros(n, dtype=bool)
        inS[S] = True
        W = assign(inst, np.sort(S))
        Ssorted = np.sort(S)
        for f in range(n):
            model.AddHint(s[f], bool(inS[f]))
        for c in range(C):
            chosen = set(Ssorted[W[c]].tolist())
            for f, v in x[c].items():
                model.AddHint(v, f in chosen)
            if z[c] is not None:
                model.AddHint(z[c], sum(1 for f in chosen if f not in x[c]))
        for f, g, y in ys:
            model.AddHint(y, bool(inS[f] and inS[g]))

    if hint is not None:
        set_hint(np.asarray(hint))

    best_S: np.ndarray | None = None
    best_W: np.ndarray | None = None
    bound = math.inf
    status_name = "UNKNOWN"
    rounds = 0
    cut_pairs: set[tuple[int, int]] = set()
    while rounds < max_rounds:
        remaining = time_limit - (time.perf_counter() - start)
        if remaining <= 0.2:
            break
        rounds += 1
        solver = cp_model.CpSolver()
        p = solver.parameters
        p.num_workers = max(1, int(workers))
        p.random_seed = int(seed)
        p.max_time_in_seconds = float(remaining)
        if deterministic:
            p.interleave_search = True
            p.max_deterministic_time = float(min(remaining, dtime)) if dtime else float(remaining)
        cb = _Progress(Q, report).cb if report is not None else None
        status = solver.Solve(model, cb) if cb is not None else solver.Solve(model)
        status_name = solver.StatusName(status)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            if bound_valid:
                bound = min(bound, solver.BestObjectiveBound() / Q + slack)
            S_new = np.flatnonzero([solver.BooleanValue(v) for v in s])
            best_S = S_new
            pos = {int(f): j for j, f in enumerate(S_new)}
            best_W = np.zeros((C, len(S_new)), dtype=bool)
            for c in range(C):
                for f, v in x[c].items():
                    if solver.BooleanValue(v):
                        best_W[c, pos[f]] = True
            if z and any(zc is not None and solver.Value(zc) > 0 for zc in z):
                best_W = None
            # lazy duplicate cuts: classes whose model assignment coincides (only when both use candidates only)
            rows: dict[tuple, list[int]] = {}
            for c in range(C):
                if z[c] is not None and solver.Value(z[c]) > 0:
                    continue
                key = tuple(sorted(f for f, v in x[c].items() if solver.BooleanValue(v)))
                rows.setdefault(key, []).append(c)
            new_pairs = [(g[0], c2) for g in rows.values() if len(g) > 1 for c2 in g[1:]]
            new_pairs = [pr for pr in new_pairs if pr not in cut_pairs]
            if status != cp_model.OPTIMAL or not new_pairs:
                break
            for c1, c2 in new_pairs:
                cut_pairs.add((c1, c2))
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
            set_hint(best_S)
        else:
            if status == cp_model.INFEASIBLE and bound_valid:
                bound = -math.inf
            break
    return CpsatResult(selection=best_S, assignment=best_W, bound=bound, status=status_name,
                       wall=time.perf_counter() - start, rounds=rounds)


# ----------------------------------------------------------------------------------------------------- solver
@dataclass
class SolveResult:
    S: np.ndarray
    W: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    stats: dict[str, Any]


def solve(inst: QpmInstance, *, time_limit: float = 60.0, seed: int = 0, workers: int = 8,
          previous: np.ndarray | None = None, M: int | None = None, deterministic: bool = True,
          progress: bool = True, use_cpsat: bool = True, cut_rounds: int = 50,
          bound_share: float = 0.9, ls_share: float = 0.4, ls_rounds_per_second: float = 1.0,
          random_starts: int = 2) -> SolveResult:
    """Warm start + local search, LP bound, CP-SAT refinement on the pruned model; returns the best solution found."""
    start = time.perf_counter()
    deadline = start + time_limit
    rng = np.random.default_rng(seed)
    stats: dict[str, Any] = {"threshold": inst.threshold, "penalised_pairs": int(len(inst.pairs))}
    if M is None:
        M = inst.n if inst.n <= 64 else max(4 * inst.k, min(inst.n, 2 * inst.K))
    bar = _Bar(progress, time_limit)

    # 1. starts + local search (deterministic work; the wall-clock deadline only guards slow machines)
    starts = {"greedy": greedy(inst)}
    if len(inst.clique) >= inst.K:
        starts["clique"] = np.sort(np.asarray(inst.clique[: inst.K]))
    if previous is not None and len(previous) == inst.K:
        starts["previous"] = np.sort(np.asarray(previous))
    alive = np.flatnonzero(np.abs(inst.coef).sum(1) > 0)
    if len(alive) < inst.K:
        alive = np.arange(inst.n)
    for i in range(random_starts if inst.n > inst.K else 0):  # seeded random starts leave the greedy basin
        starts[f"random{i}"] = np.sort(rng.choice(alive, size=inst.K, replace=False))
    greedy_S = starts["greedy"]
    greedy_W = assign(inst, greedy_S)
    stats["greedy_objective"] = inst.value(greedy_S, greedy_W)
    best_S, best_W, best_v = greedy_S, greedy_W, stats["greedy_objective"]
    # The perturbation budget grows with the time limit but is counted in rounds, not seconds, so that a given
    # (time limit, seed) gives the same result on any machine; the deadline only stops very slow machines.
    # Each start gets an equal share of the rounds, then the best one continues with as many again.
    ls_deadline = start + ls_share * time_limit
    rounds = max(10, int(ls_rounds_per_second * time_limit))
    for name, S0 in starts.items():
        S1, _ = iterated_local_search(inst, S0, rng, rounds=max(5, rounds // len(starts)), deadline=ls_deadline)
        W1 = assign(inst, S1)
        v1 = inst.value(S1, W1)
        stats[f"{name}_local_search_objective"] = v1
        if v1 > best_v + 1e-9:
            best_S, best_W, best_v = S1, W1, v1
    S1, _ = iterated_local_search(inst, best_S, rng, rounds=rounds, deadline=ls_deadline)
    W1 = assign(inst, S1)
    v1 = inst.value(S1, W1)
    if v1 > best_v + 1e-9:
        best_S, best_W, best_v = S1, W1, v1
    stats["local_search_objective"] = best_v
    stats["local_search_seconds"] = round(time.perf_counter() - start, 3)
    bar.update(time.perf_counter() - start, best_v, math.inf)

    # 2. LP bound on the pruned relaxation, tightened by clique cuts while the bound budget lasts
    t0 = time.perf_counter()
    bound = lp_bound(inst, M, cut_rounds=cut_rounds, deadline=start + bound_share * time_limit,
                     report=lambda b: bar.update(time.perf_counter() - start, best_v, b))
    stats["lp_bound"] = bound
    stats["lp_seconds"] = round(time.perf_counter() - t0, 3)
    bar.update(time.perf_counter() - start, best_v, bound)

    # 3. CP-SAT hinted with the incumbent: the exact model on small problems, else the top-M restriction
    status = "FEASIBLE"
    remaining = deadline - time.perf_counter()
    if use_cpsat and remaining > 0.5 and _gap(best_v, bound) > 1e-9:
        def report(obj: float, bnd: float) -> None:
            bar.update(time.perf_counter() - start, max(best_v, obj), bound)

        mode = "full" if M >= inst.n else "restrict"
        res = cpsat_solve(inst, M, best_S, remaining, workers=workers, seed=seed, deterministic=deterministic,
                          report=report if progress else None, mode=mode, dtime=max(0.1 * time_limit, 1.0))
        stats.update(cpsat_model=mode, cpsat_status=res.status, cpsat_seconds=round(res.wall, 3),
                     cpsat_rounds=res.rounds, candidates_per_class=int(min(M, inst.n)))
        if mode == "full":
            stats["cpsat_bound"] = res.bound
            bound = min(bound, res.bound)
        if res.selection is not None and len(res.selection) == inst.K:
            options = []
            if res.assignment is not None:
                options.append((res.selection, res.assignment))
            S2 = local_search(inst, res.selection)
            options.append((S2, assign(inst, S2)))
            for S3, W3 in options:
                if not _distinct_rows(W3) or not (W3.sum(1) == inst.k).all():
                    continue
                v3 = inst.value(S3, W3)
                stats["cpsat_objective"] = max(stats.get("cpsat_objective", -math.inf), v3)
                if v3 > best_v + 1e-9:
                    best_S, best_W, best_v = S3, W3, v3
    bound = max(bound, best_v)  # rounding slack can never make the bound smaller than a feasible value
    gap = _gap(best_v, bound)
    if gap <= 1e-6:
        status = "OPTIMAL"
    bar.update(time.perf_counter() - start, best_v, bound)
    bar.close()
    return SolveResult(S=np.sort(best_S), W=best_W, objective=best_v, bound=bound, gap=gap, status=status,
                       stats=stats)


def _distinct_rows(W: np.ndarray) -> bool:
    return len({bytes(np.packbits(r)) for r in W}) == len(W)


def _gap(obj: float, bound: float) -> float:
    if not math.isfinite(bound):
        return math.inf
    return max(0.0, bound - obj) / max(abs(obj), 1e-9)


class _Bar:
    """A rich progress bar over the time limit showing objective, bound and gap (silent when disabled)."""

    def __init__(self, enabled: bool, total: float) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("qpm select"), BarColumn(), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), transient=True)
        self.task = self.progress.add_task("starting", total=total)
        self.progress.start()

    def update(self, elapsed: float, obj: float, bound: float) -> None:
        if self.progress is None:
            return
        gap = _gap(obj, bound)
        text = f"obj {obj:.3f}  bound {bound:.3f}  gap {100 * gap:.2f}%" if math.isfinite(gap) else f"obj {obj:.3f}"
        self.progress.update(self.task, completed=min(elapsed, self.progress.tasks[0].total or elapsed),
                             description=text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------------------------------- selector
class QpmSelector:
    """QPM: exactly ``per_class`` of ``n_features`` binary features per class, distinct class sets."""

    name = "qpm"
    iterations = 1

    def __init__(self, deterministic: bool = True, candidates: int | None = None) -> None:
        self.deterministic = deterministic
        self.candidates = candidates

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        start = time.perf_counter()
        inst = make_instance(problem, n_features, per_class)
        prev = None if previous is None else np.asarray(previous.features)
        remaining = max(time_limit - (time.perf_counter() - start), 0.5)
        res = solve(inst, time_limit=remaining, seed=seed, workers=workers, previous=prev, M=self.candidates,
                    deterministic=self.deterministic, progress=progress)
        return Selection(
            features=res.S.astype(np.int64), weight=res.W.astype(np.float64), bias=None, trainable_norm=False,
            objective=res.objective, bound=res.bound, gap=res.gap, status=res.status,
            seconds=time.perf_counter() - start, solver="ortools-cpsat+local-search",
            params={"n_features": n_features, "per_class": per_class, "time_limit": time_limit, "seed": seed,
                    "workers": workers, "deterministic": self.deterministic, **_jsonable(res.stats)},
        )

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        return {}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, val in d.items():
        if isinstance(val, float | np.floating):
            val = float(val)
            out[key] = val if math.isfinite(val) else None
        elif isinstance(val, np.integer):
            out[key] = int(val)
        else:
            out[key] = val
    return out
