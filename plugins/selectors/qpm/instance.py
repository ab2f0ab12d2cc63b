"""The selection problem as the ``qpm`` selector sees it: :class:`QpmInstance` (scaled class values, penalised
pairs, bonus), its objective for a feature set, the top-M candidates the bounds and CP-SAT's restriction use, and the
relative gap with the one optimality tolerance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qpm_plugins.selectors.qpm.assignment import exact_assignment

from qpmcli.contracts import SelectionProblem


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


def assign(inst: QpmInstance, S: np.ndarray) -> np.ndarray:
    """The optimal W [C, K] for the sorted selection S: exactly k per class, distinct class sets (exact).

    See :func:`exact_assignment`.
    """
    return exact_assignment(inst.coef[np.asarray(S)].T, inst.k)[0]


def default_candidates(inst: QpmInstance) -> int:
    """The top-M candidate count of the bounds when none is given: every feature up to 64, else max(4k, min(n, 2K))."""
    return inst.n if inst.n <= 64 else max(4 * inst.k, min(inst.n, 2 * inst.K))


def candidates(inst: QpmInstance, M: int) -> np.ndarray:
    """Per class the indices of its top-M features by value, [C, M] (M = n: no pruning)."""
    M = min(M, inst.n)
    return np.argsort(-inst.coef, axis=0, kind="stable")[:M].T


OPT_TOL = 1e-6  # relative gap at or below which a result is OPTIMAL; the only optimality tolerance used


def gap_of(obj: float, bound: float) -> float:
    """Relative gap (bound - objective) / |objective|; inf without a finite bound."""
    if not math.isfinite(bound):
        return math.inf
    return max(0.0, bound - obj) / max(abs(obj), 1e-9)
