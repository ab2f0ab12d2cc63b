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

import functools
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
    threshold_info: dict[str, Any] = field(default_factory=dict)  # RedundancyThreshold.info(): rule, step, clique size
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

    def topk_value(self, S: np.ndarray) -> float:
        """Z for selection S when every class takes its top-k in S (duplicates allowed: an upper bound for S)."""
        S = np.asarray(S)
        sub = self.coef[S]
        top = -np.partition(-sub, self.k - 1, axis=0)[: self.k]
        return float(top.sum() - 0.5 * self.P[np.ix_(S, S)].sum() + self.bonus[S].sum())

    def selection_value(self, S: np.ndarray) -> float:
        """Z of selection S with its best distinct-sets assignment (the true objective of S; exact)."""
        S = np.sort(np.asarray(S))
        _, gain = exact_assignment(self.coef[S].T, self.k)
        return gain - 0.5 * float(self.P[np.ix_(S, S)].sum()) + float(self.bonus[S].sum())

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
    thr = clique_threshold(problem.R, K, rule=getattr(problem, "threshold_rule", "reference"))
    pairs, w = disallowed_pairs(problem.R, thr.threshold)
    bonus = np.zeros(A.shape[0]) if problem.B is None else np.asarray(problem.B, dtype=np.float64).ravel()
    return QpmInstance(coef=A * (1000.0 / (k * C)), pairs=pairs, pair_w=w, bonus=bonus, K=K, k=k,
                       threshold=float(thr.threshold), clique=list(thr.clique), threshold_info=thr.info())


# ------------------------------------------------------------------------------------------ assignment for fixed S
def assign(inst: QpmInstance, S: np.ndarray) -> np.ndarray:
    """The optimal W [C, K] for the sorted selection S: exactly k per class, distinct class sets (exact).

    See :func:`exact_assignment`.
    """
    return exact_assignment(inst.coef[np.asarray(S)].T, inst.k)[0]


def exact_assignment(sub: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Optimal distinct-sets assignment ``(W [C, K], value)`` for class values ``sub`` [C, K] (exact, polynomial).

    Every class takes its top-k set unless two classes' top sets coincide. The colliding classes form groups (one per
    shared top set); a group Y lists each of its classes' top-|Y| k-subsets. Groups whose lists share a subset merge,
    and a class outside every group whose top set is in a group's list joins that group, until nothing changes.
    Then each group is closed: an exchange argument shows that inside Y each class needs only its own top-|Y|
    k-subsets (at most |Y| - 1 of them are taken by the others). Dropping the distinctness between groups gives an
    upper bound, the sum of the groups' own optima and the other classes' top values; each group's optimum is a
    linear assignment (scipy) of its classes to the union of its lists. The groups' lists are disjoint and contain
    no other class's top set, so these assignments together are feasible: they reach the bound and are optimal.
    """
    from scipy.cluster.hierarchy import DisjointSet
    from scipy.optimize import linear_sum_assignment

    C, K = sub.shape
    order = np.argsort(-sub, axis=1, kind="stable")
    W = np.zeros((C, K), dtype=bool)
    W[np.arange(C)[:, None], order[:, :k]] = True
    topk = np.sort(order[:, :k], axis=1)
    if K ** k < 2 ** 62:  # each top set as one integer (base K): a 1-D unique is much faster than a row unique
        _, inv, counts = np.unique(topk @ (K ** np.arange(k, dtype=np.int64)), return_inverse=True,
                                   return_counts=True)
    else:
        _, inv, counts = np.unique(topk, axis=0, return_inverse=True, return_counts=True)
    if counts.max(initial=1) <= 1:
        return W, float((sub * W).sum())
    n_sets = math.comb(K, k)
    if n_sets <= _ALL_SUBSETS:  # few k-subsets: one linear assignment over all of them (same optimum, faster)
        subsets = _subsets(K, k)
        rows, chosen = linear_sum_assignment(-sub[:, subsets].sum(2))
        W[:] = False
        for c, j in zip(rows, chosen, strict=True):
            W[c, subsets[j]] = True
        return W, float((sub * W).sum())
    inv = inv.ravel()
    top = [tuple(r) for r in topk.tolist()]
    owner = {top[c]: c for c in range(C) if counts[inv[c]] == 1}  # unique top sets -> their class
    groups: dict[int, list[int]] = {}  # group id -> classes
    for c in np.flatnonzero(counts[inv] > 1).tolist():
        groups.setdefault(int(inv[c]), []).append(c)
    lists: dict[int, list[tuple[int, ...]]] = {}
    while True:
        holder: dict[tuple[int, ...], int] = {}  # listed subset -> the group listing it
        merge: list[tuple[int, int]] = []
        joins: dict[int, int] = {}
        for g, Y in groups.items():
            m = min(len(Y), n_sets)
            for c in Y:
                if len(lists.get(c, ())) < m:
                    lists[c] = _top_subsets(sub[c], order[c], k, m)
                for t in lists[c][:m]:
                    h = holder.setdefault(t, g)
                    if h != g:
                        merge.append((h, g))
                    o = owner.get(t)
                    if o is not None:
                        joins[o] = g
        if not merge and not joins:
            break
        for o, g in joins.items():
            del owner[top[o]]
            groups[g].append(o)
        union = DisjointSet(groups)
        for a, b in merge:
            union.merge(a, b)
        merged: dict[int, list[int]] = {}
        for g, Y in groups.items():
            merged.setdefault(union[g], []).extend(Y)
        groups = merged
    for Y in groups.values():
        m = min(len(Y), n_sets)
        cols = sorted({t for c in Y for t in lists[c][:m]})
        col_of = {t: j for j, t in enumerate(cols)}
        value = np.full((len(Y), len(cols)), -1e18)
        for i, c in enumerate(Y):
            for t in lists[c][:m]:
                value[i, col_of[t]] = float(sub[c, list(t)].sum())
        rows, chosen = linear_sum_assignment(-value)
        for i, j in zip(rows, chosen, strict=True):
            c = Y[i]
            W[c] = False
            W[c, list(cols[j])] = True
    return W, float((sub * W).sum())


_ALL_SUBSETS = 2000


@functools.lru_cache(maxsize=32)
def _subsets(K: int, k: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(K), k)), dtype=np.int64).reshape(-1, k)


def _top_subsets(vals: np.ndarray, order: np.ndarray, k: int, m: int) -> list[tuple[int, ...]]:
    """The m best k-subsets (as sorted index tuples) of ``vals`` by sum, best first (best-first enumeration over
    positions in the descending ``order``; ties in the order of that enumeration)."""
    import heapq

    K = len(vals)
    sv = vals[order]
    first = tuple(range(k))
    heap = [(-float(sv[list(first)].sum()), first)]
    seen = {first}
    out: list[tuple[int, ...]] = []
    while heap and len(out) < m:
        neg, pos = heapq.heappop(heap)
        out.append(tuple(sorted(int(order[p]) for p in pos)))
        for i in range(k):  # move position i one step down if that slot is free
            nxt = pos[i] + 1
            if nxt >= K or (i + 1 < k and pos[i + 1] == nxt):
                continue
            cand = pos[:i] + (nxt,) + pos[i + 1:]
            if cand not in seen:
                seen.add(cand)
                heapq.heappush(heap, (neg + float(sv[pos[i]] - sv[nxt]), cand))
    return out


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


_MAX_CHECKS = 64  # exact evaluations per local-search move before settling for the best true improvement seen


def local_search(inst: QpmInstance, S: np.ndarray, max_moves: int = 10_000, deadline: float = math.inf) -> np.ndarray:
    """Best-improvement 1-swap local search on the selection, scored by the true objective (distinct class sets).

    All K x (n-K) swaps (f out, g in) are scored at once by the top-k value of S' (every class its top-k of S',
    duplicates allowed): a class using f gets its (k+1)-th best, every class gains max(0, A[g] - new k-th best).
    That score is an upper bound on the true value of S', exact when the top-k sets are distinct. Swaps are then
    checked in decreasing order of the bound with the exact distinct-sets value (:func:`exact_assignment`) until the
    bound cannot beat the best true value found, so the move taken is the best true improvement (within
    ``_MAX_CHECKS`` exact evaluations per move). Deterministic; the deadline only truncates (the result so far).
    """
    S = np.sort(np.asarray(S)).copy()
    n, k, K = inst.n, inst.k, inst.K
    if K <= k or K >= n:
        return S
    cur_v = inst.selection_value(S)
    for _ in range(max_moves):
        if time.perf_counter() > deadline:
            break
        inS = np.zeros(n, dtype=bool)
        inS[S] = True
        G = np.flatnonzero(~inS)
        sub = inst.coef[S]  # [K, C]
        part = -np.sort(-sub, axis=0)
        kth, k1 = part[k - 1], part[k]  # k-th and (k+1)-th best values in S per class
        rank = np.argsort(np.argsort(-sub, axis=0, kind="stable"), axis=0, kind="stable")
        in_top = rank < k
        loss = np.where(in_top, sub - k1, 0.0).sum(1)  # [K]
        cg = inst.coef[G]  # [G, C]
        # gain[i, g] = sum_c max(0, A[g, c] - newkth[i, c]); newkth[i] differs from kth only on the classes whose
        # top-k holds S_i (k per class, so K x C work becomes C x k)
        gain = np.repeat(np.maximum(cg - kth, 0.0).sum(1)[None, :], K, axis=0)
        for i in range(K):
            cols = np.flatnonzero(in_top[i])
            if len(cols):
                sl = cg[:, cols]
                gain[i] += (np.maximum(sl - k1[cols], 0.0) - np.maximum(sl - kth[cols], 0.0)).sum(1)
        pen_S = inst.P[np.ix_(S, S)].sum(1)  # [K]
        pen_G = inst.P[np.ix_(G, S)]  # [G, K]
        pen_add = pen_G.sum(1)[None, :] - pen_G.T  # [K, G]: penalty g gets with S \ {S_i}
        delta = gain - loss[:, None] + pen_S[:, None] - pen_add + inst.bonus[G][None, :] - inst.bonus[S][:, None]
        ub = inst.topk_value(S) + delta  # upper bound on the true value of each swapped selection
        above = np.flatnonzero(ub.ravel() > cur_v + 1e-9)  # only swaps whose bound beats the current value
        flat = above[np.argsort(-ub.ravel()[above], kind="stable")]
        best_v, best_S = cur_v, None
        for cnt, idx in enumerate(flat):
            i, j = divmod(int(idx), len(G))
            if ub[i, j] <= best_v + 1e-9 or cnt >= _MAX_CHECKS:
                break
            cand = S.copy()
            cand[i] = G[j]
            cand.sort()
            v = inst.selection_value(cand)
            if v > best_v + 1e-9:
                best_v, best_S = v, cand
        if best_S is None:
            break
        S, cur_v = best_S, best_v
    return S


def iterated_local_search(inst: QpmInstance, S: np.ndarray, rng: np.random.Generator, rounds: int,
                          deadline: float, kicks: tuple[int, ...] = (4, 8, 12, 16)) -> tuple[np.ndarray, float]:
    """Perturb (random swaps), re-optimise, keep if better (true objective); deterministic for a given rng.

    The kick size cycles through ``kicks`` (capped at K // 3 and the number of unselected features): small kicks
    polish, large ones leave the basin. The deadline only truncates the rounds.
    """
    state = IlsState(inst, S, rng, kicks, deadline=deadline)
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        state.round(deadline)
    return state.best, state.best_v


class IlsState:
    """An iterated local search that can be continued round by round (one deterministic stream per solve)."""

    def __init__(self, inst: QpmInstance, S: np.ndarray, rng: np.random.Generator,
                 kicks: tuple[int, ...] = (4, 8, 12, 16), deadline: float = math.inf) -> None:
        self.inst, self.rng = inst, rng
        self.best = local_search(inst, S, deadline=deadline)
        self.best_v = inst.selection_value(self.best)
        cap = max(1, min(inst.K // 3, inst.n - inst.K))
        self.sizes = sorted({max(1, min(int(kk), cap)) for kk in kicks}) or [1]
        self.rounds = 0

    def offer(self, S: np.ndarray, v: float) -> bool:
        """Adopt an outside solution (e.g. CP-SAT's) when it is better; the random stream is not touched."""
        if v > self.best_v + 1e-9:
            self.best, self.best_v = np.sort(np.asarray(S)).copy(), v
            return True
        return False

    def round(self, deadline: float = math.inf) -> bool:
        inst = self.inst
        kick = self.sizes[self.rounds % len(self.sizes)]
        self.rounds += 1
        if inst.n <= inst.K:
            return False
        cur = self.best.copy()
        inS = np.zeros(inst.n, dtype=bool)
        inS[cur] = True
        outs = self.rng.choice(inst.K, size=min(kick, inst.K), replace=False)
        pool = np.flatnonzero(~inS)
        ins = self.rng.choice(pool, size=min(kick, len(pool)), replace=False)
        cur[outs[: len(ins)]] = ins
        cur = local_search(inst, np.sort(cur), deadline=deadline)
        return self.offer(cur, inst.selection_value(cur))


# ------------------------------------------------------------------------------------------------------ bounds
def default_candidates(inst: QpmInstance) -> int:
    """The top-M candidate count of the bounds when none is given: every feature up to 64, else max(4k, min(n, 2K))."""
    return inst.n if inst.n <= 64 else max(4 * inst.k, min(inst.n, 2 * inst.K))


def candidates(inst: QpmInstance, M: int) -> np.ndarray:
    """Per class the indices of its top-M features by value, [C, M] (M = n: no pruning)."""
    M = min(M, inst.n)
    return np.argsort(-inst.coef, axis=0, kind="stable")[:M].T


def lp_bound(inst: QpmInstance, M: int, penalty: bool = True, *, cut_rounds: int = 0,
             deadline: float = math.inf, report=None) -> float:
    """Upper bound from the LP relaxation of the pruned model (fallback slot per class, McCormick pair penalties),
    optionally tightened by rounds of clique cuts on the penalty (runs :class:`LpBound` to the end)."""
    lp = LpBound(inst, M, penalty=penalty, cut_rounds=cut_rounds)
    while not lp.done:
        b = lp.step(deadline)
        if report is not None and math.isfinite(b):
            report(b)
        if time.perf_counter() > deadline - 1.0 and lp.rounds > 0:
            break
    return lp.bound


class LpBound:
    """A certified bound source: the LP relaxation (GLOP) of the pruned model, one solve + clique cuts per step.

    Valid because every feasible solution maps to a feasible LP point of at least the same value: a class's features
    outside its top-M are worth at most the (M+1)-th best value, which the fallback slot pays without needing s;
    penalties between features that are no class's candidate are dropped (which only raises the optimum).
    Clique cut: for features T that are pairwise disallowed, m = |S & T| selected ones pay at least phi(m), the convex
    envelope of the least penalty of m members of T (:func:`clique_penalty_floor`), so for every j the secant
    sum_{pairs in T} w y >= phi(j) + (phi(j+1) - phi(j)) (sum_T s - j) holds for every solution. These are the cuts the
    McCormick LP needs: it likes to take redundant features half each, paying no penalty.

    The interface of every bound source of :func:`solve`: ``name``, ``bound`` (the best certified bound so far, inf
    before the first), ``done`` (nothing more to gain) and ``step(deadline) -> bound``.
    """

    name = "lp"

    def __init__(self, inst: QpmInstance, M: int, penalty: bool = True, cut_rounds: int = 50) -> None:
        self.inst, self.M, self.penalty, self.cut_rounds = inst, min(M, inst.n), penalty, cut_rounds
        self.bound = math.inf
        self.done = False
        self.rounds = 0
        self.solver = None
        self.packing: list[tuple[tuple[int, ...], list[int], int]] = []  # distinct-set cuts found so far

    def _build(self) -> None:
        from ortools.linear_solver import pywraplp

        inst, M = self.inst, self.M
        n, C, k, K = inst.n, inst.C, inst.k, inst.K
        cand = candidates(inst, M)
        solver = pywraplp.Solver.CreateSolver("GLOP")
        s = [solver.NumVar(0.0, 1.0, "") for _ in range(n)]
        solver.Add(solver.Sum(s) == K)
        obj = solver.Objective()
        for f in range(n):
            if inst.bonus[f] != 0:
                obj.SetCoefficient(s[f], float(inst.bonus[f]))
        order_vals = -np.sort(-inst.coef, axis=0)
        self.xvar: dict[tuple[int, int], Any] = {}
        for c in range(C):
            xs = []
            for f in cand[c]:
                x = solver.NumVar(0.0, 1.0, "")
                solver.Add(x <= s[f])
                obj.SetCoefficient(x, float(inst.coef[f, c]))
                xs.append(x)
                self.xvar[(int(f), c)] = x
            if M < n:
                z = solver.NumVar(0.0, float(k), "")
                obj.SetCoefficient(z, float(order_vals[M, c]))
                xs.append(z)
            solver.Add(solver.Sum(xs) == k)
        relevant = np.zeros(n, dtype=bool)
        relevant[np.unique(cand)] = True
        Y: dict[tuple[int, int], Any] = {}
        if self.penalty:
            for (f, g), w in zip(inst.pairs, inst.pair_w, strict=True):
                if relevant[f] and relevant[g]:  # other pairs dropped: a relaxation, still an upper bound
                    y = solver.NumVar(0.0, 1.0, "")
                    solver.Add(y >= s[int(f)] + s[int(g)] - 1)
                    obj.SetCoefficient(y, -float(w))
                    Y[(int(f), int(g))] = y
        obj.SetMaximization()
        self.solver, self.s, self.obj, self.Y, self.relevant = solver, s, obj, Y, relevant

    def step(self, deadline: float = math.inf) -> float:
        from ortools.linear_solver import pywraplp

        if self.done:
            return self.bound
        if self.solver is None:
            self._build()
        remaining = deadline - time.perf_counter()
        if remaining <= 0.05:
            return self.bound
        if math.isfinite(remaining):
            self.solver.SetTimeLimit(int(max(remaining, 0.05) * 1000))
        status = self.solver.Solve()
        if status != pywraplp.Solver.OPTIMAL:
            return self.bound  # an unfinished LP proves nothing; keep the last bound (the step may be retried)
        self.rounds += 1
        val = float(self.obj.Value())
        # GLOP works in floating point: pad by its tolerance so the bound stays on the safe side
        self.bound = min(self.bound, val + 1e-6 * max(1.0, abs(val)))
        if self.rounds > self.cut_rounds:
            self.done = True
            return self.bound
        sv = np.array([v.solution_value() for v in self.s])
        yv = {p: v.solution_value() for p, v in self.Y.items()}
        X = np.zeros((self.inst.n, self.inst.C))
        for (f, c), v in self.xvar.items():
            X[f, c] = v.solution_value()
        new = packing_cuts(X, self.inst.k, self.inst.K, self.inst.coef)
        for U, gamma, rhs in new:
            self.solver.Add(self.solver.Sum([self.xvar[(f, c)] for c in gamma for f in U if (f, c) in self.xvar])
                            <= rhs)
        self.packing.extend(new)
        added = _add_clique_cuts(self.inst, self.solver, self.s, self.Y, sv, yv, self.relevant) if self.Y else 0
        if added == 0 and not new:
            self.done = True
        return self.bound


def packing_cuts(X: np.ndarray, k: int, K: int, coef: np.ndarray, max_cuts: int = 40, max_extra: int = 2
                 ) -> list[tuple[tuple[int, ...], list[int], int]]:
    """Violated distinct-set cuts for fractional class assignments X [n, C]: ``(U, G, rhs)`` with
    sum_{c in G} sum_{f in U} x[f, c] <= rhs = |G| (k - 1) + min(|G|, binom(|U|, k)).

    Valid for every solution with distinct class sets: a class has at most k features in U, and k only when its set
    lies inside U, which at most binom(|U|, k) classes can do. U = each class's u largest x (u = k .. k +
    max_extra), G = the classes with more than k - 1 in U (the most violated choice for that U). Most violated first.
    """
    n, C = X.shape
    order = np.argsort(-(X + 1e-6 * coef), axis=0, kind="stable")
    found: dict[tuple[int, ...], float] = {}
    for u in range(k, min(k + max_extra, K) + 1):
        cap = math.comb(u, k)
        for c in range(C):
            U = tuple(sorted(order[:u, c].tolist()))
            if U in found:
                continue
            t = X[list(U)].sum(0) - (k - 1)
            gamma = np.flatnonzero(t > 1e-9)
            viol = float(t[gamma].sum()) - cap
            if len(gamma) >= cap and viol > 1e-4:
                found[U] = viol
    out = []
    for U, _ in sorted(found.items(), key=lambda kv: -kv[1])[:max_cuts]:
        t = X[list(U)].sum(0) - (k - 1)
        gamma = [int(c) for c in np.flatnonzero(t > 1e-9)]
        out.append((U, gamma, len(gamma) * (k - 1) + min(len(gamma), math.comb(len(U), k))))
    return out


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


ILS_GROWTH_CAP = 6  # at most ils_rounds * 2**6 local-search rounds per cycle
# Local-search rounds of the first cycle. At CUB size (512 x 200) a round takes about 0.1 s and a CP-SAT chunk on the
# top-M restriction 10-20 s (improving nothing in every CUB run measured); 64 rounds gave the best 60 s results there
# (benchmarks/results/selection.md).
ILS_ROUNDS_EXACT = 8
ILS_ROUNDS_LARGE = 64
START_ROUNDS_LARGE = 16  # large problems: iterated-search rounds from each start before the best one goes on


def exact_model_fits(inst: QpmInstance) -> bool:
    """Whether CP-SAT gets the exact model (every feature a candidate of every class) instead of the top-M
    restriction: the licence-sized problems (n <= 64) and anything up to 4,000 (feature, class) entries."""
    return inst.n <= 64 or inst.n * inst.C <= 4000


def solve(inst: QpmInstance, *, time_limit: float = 60.0, seed: int = 0, workers: int = 8,
          previous: np.ndarray | None = None, M: int | None = None, deterministic: bool = True,
          progress: bool = True, use_cpsat: bool = True, cut_rounds: int = 50, work_limit: int | None = None,
          bound_sources: list | None = None, ils_rounds: int | None = None, random_starts: int = 2,
          exact_model: bool | None = None, ils_growth: bool = True, start_rounds: int | None = None) -> SolveResult:
    """One deterministic search that runs until the optimum is proven, the time limit or ``work_limit`` cycles.

    1. Starts (greedy, the clique, ``previous``, ``random_starts`` seeded random sets), each improved by
       :func:`local_search` and, on problems larger than the exact model, ``start_rounds`` (default
       :data:`START_ROUNDS_LARGE`) iterated-search rounds of its own; the best one seeds the iterated local search
       (:class:`IlsState`) that continues. Scores are the true
       objective of a feature set (its optimal distinct-sets assignment).
    2. Then cycles, each in a fixed order (bound, CP-SAT, search on problems that get the exact model; search,
       bound, CP-SAT on larger ones): ``ils_rounds`` perturbation rounds (default :data:`ILS_ROUNDS_EXACT` on the
       exact model, :data:`ILS_ROUNDS_LARGE` on larger problems; with ``ils_growth``, the default, times
       ``2**cycle``, at most 2**:data:`ILS_GROWTH_CAP`, as CP-SAT's chunks double too); one step
       of every bound source (default: :class:`LpBound`, the cut LP; any object with ``name``, ``bound``, ``done`` and
       ``step(deadline) -> certified upper bound`` can be passed in ``bound_sources``; one with ``finish()`` works
       in its own thread, is only read at each cycle and is finished before the result); one CP-SAT chunk
       (:class:`CpsatModel`: the exact model on small problems, where a chunk that ends OPTIMAL proves the optimum;
       else the top-M restriction), hinted with the incumbent, of 0.5, 1, 2, ... deterministic seconds (doubling, up
       to 32 on the exact model, 8 on the restriction). CP-SAT's solutions join the local search's incumbent.
    Nothing in this schedule depends on the time limit: a limit only stops the search (the round or chunk in
    flight keeps what it found so far), so for the same seed a longer limit continues the same search and never
    returns a worse selection (deterministic CP-SAT; exactly so with ``work_limit`` instead of a clock).
    3. The result is the incumbent's feature set with its exact optimal assignment (:func:`exact_assignment`), the
    smallest certified bound, and status OPTIMAL iff the relative gap is at most :data:`OPT_TOL`.
    """
    import scipy.optimize  # noqa: F401  (loaded before the clock starts: the exact assignment uses it)

    start = time.perf_counter()
    deadline = start + time_limit
    rng = np.random.default_rng(seed)
    stats: dict[str, Any] = {**inst.threshold_info, "threshold": inst.threshold,
                             "penalised_pairs": int(len(inst.pairs))}
    if M is None:
        M = default_candidates(inst)
    full = exact_model_fits(inst) if exact_model is None else bool(exact_model)
    if ils_rounds is None:  # large problems: CP-SAT's restricted chunks are slow and rarely help; search more
        ils_rounds = ILS_ROUNDS_EXACT if full else ILS_ROUNDS_LARGE
    bar = _Bar(progress, time_limit)

    def now() -> float:
        return time.perf_counter()

    sources = [LpBound(inst, M, cut_rounds=cut_rounds)] if bound_sources is None else list(bound_sources)
    for src in sources:  # background sources start now: they use the core that the starts leave idle
        if hasattr(src, "finish"):
            src.step(deadline)

    # 1. starts
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
    stats["greedy_objective"] = inst.selection_value(starts["greedy"])
    best_S, best_v = starts["greedy"], stats["greedy_objective"]
    if start_rounds is None:
        start_rounds = 0 if full else START_ROUNDS_LARGE
    for name, S0 in starts.items():  # the greedy start's local search always completes (a floor on the result)
        S1 = local_search(inst, S0, deadline=math.inf if name == "greedy" else deadline)
        if start_rounds and now() < deadline:  # every start gets its own iterated search: diversity
            S1, _ = iterated_local_search(inst, S1, rng, rounds=start_rounds, deadline=deadline)
        v1 = inst.selection_value(S1)
        stats[f"{name}_local_search_objective"] = v1
        if v1 > best_v + 1e-9:
            best_S, best_v = S1, v1
    ils = IlsState(inst, best_S, rng, deadline=deadline)
    stats["local_search_objective"] = ils.best_v
    trajectory: list[list[float]] = [[round(now() - start, 3), ils.best_v, math.inf]]  # (seconds, objective, bound)

    def record(b: float) -> None:
        if ils.best_v > trajectory[-1][1] + 1e-12 or b < trajectory[-1][2] - 1e-12:
            trajectory.append([round(now() - start, 3), ils.best_v, b])
    bar.update(now() - start, ils.best_v, math.inf)

    # 2. cycles
    bound = math.inf
    cp: CpsatModel | None = None
    cp_cuts: dict[int, int] = {}
    time_to_best = now() - start
    cycle = 0

    def proven() -> bool:
        return gap_of(ils.best_v, max(bound, ils.best_v)) <= OPT_TOL or (cp is not None and cp.proven)

    def ils_rounds_step() -> None:
        nonlocal time_to_best
        # CP-SAT's chunks double; the search's rounds double with them (capped), so it keeps its share of a long run
        for _ in range(ils_rounds * 2 ** min(cycle, ILS_GROWTH_CAP) if ils_growth else ils_rounds):
            if now() >= deadline:
                break
            if ils.round(deadline):
                time_to_best = now() - start
                record(bound)

    def bound_step() -> None:
        nonlocal bound
        for src in sources:  # a source that runs in its own thread (sdp.ConcurrentSource) is only read here
            if not src.done and now() < deadline:
                src.step(deadline)
            if src.bound < bound:
                bound = src.bound
                stats[f"{src.name}_bound"] = src.bound
            record(bound)
        bar.update(now() - start, ils.best_v, bound)

    def cpsat_step() -> None:
        nonlocal cp, bound, time_to_best
        if not use_cpsat or now() >= deadline or proven():
            return
        if cp is None:
            cp = CpsatModel(inst, M, "full" if full else "restrict", ils.best)
        dtime = min(0.5 * 2 ** cycle, 32.0 if full else 8.0)

        def report(obj: float, bnd: float) -> None:
            bar.update(now() - start, max(ils.best_v, obj), bound)

        for src in sources:  # distinct-set cuts found by the LP strengthen CP-SAT's own LP
            for cut in getattr(src, "packing", [])[cp_cuts.get(id(src), 0):]:
                cp.add_packing(*cut)
            cp_cuts[id(src)] = len(getattr(src, "packing", []))
        S2, _ = cp.chunk(ils.best, dtime=dtime, deadline=deadline, workers=workers, seed=seed,
                         deterministic=deterministic, report=report if progress else None)
        if S2 is not None and len(S2) == inst.K and ils.offer(S2, inst.selection_value(S2)):
            time_to_best = now() - start
            stats["cpsat_improved"] = stats.get("cpsat_improved", 0) + 1
        if cp.bound_valid:
            bound = min(bound, cp.bound)
            stats["cpsat_bound"] = cp.bound
        record(bound)

    # small problems: proof work first (the exact model proves them); large ones: the search first
    steps = (bound_step, cpsat_step, ils_rounds_step) if full else (ils_rounds_step, bound_step, cpsat_step)
    names = {ils_rounds_step: "search", bound_step: "bound", cpsat_step: "cpsat"}
    spent = {"starts": round(now() - start, 3), "search": 0.0, "bound": 0.0, "cpsat": 0.0}  # wall seconds by step
    while not proven() and now() < deadline and (work_limit is None or cycle < work_limit):
        for step in steps:
            if proven() or now() >= deadline:
                break
            t_step = now()
            step()
            spent[names[step]] += now() - t_step
        cycle += 1
        bar.update(now() - start, ils.best_v, bound)

    for src in sources:  # wait for background bound work (at most the chunk in flight) and take its last bound
        if hasattr(src, "finish"):
            bound = min(bound, src.finish())
            stats[f"{src.name}_bound"] = src.bound

    # 3. the incumbent with its exact assignment
    best_S = np.sort(ils.best)
    best_W = assign(inst, best_S)
    best_v = inst.value(best_S, best_W)
    bound = max(bound, best_v)  # the bound can never be below a feasible value
    gap = gap_of(best_v, bound)
    status = "OPTIMAL" if gap <= OPT_TOL else "FEASIBLE"
    record(bound)
    stats["trajectory"] = [[t, v, b if math.isfinite(b) else None] for t, v, b in trajectory]
    stats["step_seconds"] = {key: round(val, 3) for key, val in spent.items()}
    stats.update(cycles=cycle, ils_rounds=ils.rounds, seconds=round(now() - start, 3),
                 time_to_best=round(time_to_best, 3), cpsat_model=None if cp is None else cp.mode,
                 cpsat_chunks=0 if cp is None else cp.chunks, cpsat_status=None if cp is None else cp.status,
                 proven_by=("cpsat" if cp is not None and cp.proven else "bound") if status == "OPTIMAL" else None)
    bar.update(now() - start, best_v, bound)
    bar.close()
    return SolveResult(S=best_S, W=best_W, objective=best_v, bound=bound, gap=gap, status=status, stats=stats)


def _distinct_rows(W: np.ndarray) -> bool:
    return len({bytes(np.packbits(r)) for r in W}) == len(W)


OPT_TOL = 1e-6  # relative gap at or below which a result is OPTIMAL; the only optimality tolerance used


def gap_of(obj: float, bound: float) -> float:
    """Relative gap (bound - objective) / |objective|; inf without a finite bound."""
    if not math.isfinite(bound):
        return math.inf
    return max(0.0, bound - obj) / max(abs(obj), 1e-9)




class _Bar:
    """A rich progress bar over the time limit showing objective, bound and gap (silent when disabled)."""

    def __init__(self, enabled: bool, total: float) -> None:
        self.progress = None
        if not enabled:
            return
        from qpmcli.progress import progress_bar

        self.progress = progress_bar(elapsed=True)
        self.task = self.progress.add_task("qpm select: starting", total=total)
        self.progress.start()

    def update(self, elapsed: float, obj: float, bound: float) -> None:
        if self.progress is None:
            return
        gap = gap_of(obj, bound)
        text = f"obj {obj:.3f}  bound {bound:.3f}  gap {100 * gap:.2f}%" if math.isfinite(gap) else f"obj {obj:.3f}"
        self.progress.update(self.task, completed=min(elapsed, self.progress.tasks[0].total or elapsed),
                             description=f"qpm select: {text}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------------------------------- selector
class QpmSelector:
    """QPM: exactly ``per_class`` of ``n_features`` binary features per class, distinct class sets."""

    name = "qpm"
    iterations = 1

    def __init__(self, deterministic: bool = True, candidates: int | None = None, bound: str = "auto") -> None:
        self.deterministic = deterministic
        self.candidates = candidates
        self.bound = bound  # lp | sdp | auto: the certified bound's source (sdp.choose_bound)

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        start = time.perf_counter()
        inst = make_instance(problem, n_features, per_class)
        prev = None if previous is None else np.asarray(previous.features)
        remaining = max(time_limit - (time.perf_counter() - start), 0.5)
        from qpm_plugins.selectors.sdp import bound_sources, bound_stats

        sources = bound_sources(self.bound, inst, self.candidates, remaining)
        res = solve(inst, time_limit=remaining, seed=seed, workers=workers, previous=prev, M=self.candidates,
                    deterministic=self.deterministic, progress=progress, bound_sources=sources)
        return Selection(
            features=res.S.astype(np.int64), weight=res.W.astype(np.float64), bias=None, trainable_norm=False,
            objective=res.objective, bound=res.bound, gap=res.gap, status=res.status,
            seconds=time.perf_counter() - start, solver="ortools-cpsat+local-search",
            params={"n_features": n_features, "per_class": per_class, "time_limit": time_limit, "seed": seed,
                    "workers": workers, "deterministic": self.deterministic, **_jsonable(res.stats),
                    **bound_stats(self.bound, sources, res.stats, res.bound)},
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
