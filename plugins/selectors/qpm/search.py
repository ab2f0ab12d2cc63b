"""The search over feature sets: the greedy start, best-improvement swap local search scored by the true
objective, and the iterated local search (seeded kicks) that :func:`~qpm_plugins.selectors.qpm.solver.solve`
continues round by round."""

from __future__ import annotations

import math
import time

import numpy as np
from qpm_plugins.selectors.qpm.instance import QpmInstance


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
