"""The ``gurobi`` selector: the QPM selection MIP (METHOD.md §6.5) on Gurobi, for users who hold a licence.

Optional: ``pip install "qpm[gurobi]"`` installs ``gurobipy``, whose pip wheel carries a size-limited licence (at most
2,000 variables and 2,000 linear constraints, no quadratic objective above 200 variables). ``gurobipy`` is imported
only when this selector runs; without it the selector fails with one line saying how to install it.

The objective is the paper's, term for term, on the same instance as the ``qpm`` selector (the scaled class values
1000/(kC)·A, the clique threshold's penalised pairs and weights, the optional B bonus; ``make_instance``):

    max  sum_{f,c} coef[f,c] x[f,c]  -  sum_{disallowed f<g} w[f,g] s_f s_g  +  sum_f b_f s_f
    s.t. sum_f s_f = K,   sum_f x[f,c] = k for every class c,   x[f,c] <= s_f,   distinct class sets.

The paper's E = Wv·s is the linear x <= s (Wv is free); its ClassSparsity iteration reaches exactly k per class, which
is a constraint here. Pair products are linearised (no quadratic objective): per pair ``y_fg >= s_f + s_g - 1`` when
the model fits the licence, else Glover's per-feature form ``p_f >= sum_{g>f} w_fg s_g - W_f (1 - s_f)``, which is
exact for binary s with n variables instead of one per pair. When the per-(f, c) links do not fit either, they are
aggregated to ``sum_c x[f,c] <= min(C, binom(K-1, k-1)) s_f`` (exact for integers; a feature can sit in at most that
many distinct k-sets). The strongest form that the licence accepts is used (``params.model_form``).

Distinct class sets are lazy constraints, as the reference adds them iteratively (§6.6 DeDuplication): whenever an
integer solution gives the classes G the same set F, the cut ``sum_{c in G} sum_{f in F} x[f,c] <= |G| (k-1) + 1``
is added (exact: a class reaches k on F only if it uses F, and at most one may). The same set-packing family over
larger feature sets U (``binom(|U|, k)`` classes may fit inside U) is separated as user cuts on the node LPs; the LP
alone ignores distinct sets, which is what makes instances where they bind (20 classes, 8 features, k = 2) hard.
The MIP start is the clique's first K features, as in the reference (``s.start``), with their optimal
distinct-sets assignment (the reference starts only s; without x, lazy constraints reject Gurobi's first solutions).
Gurobi runs with ``MIPGap`` 0 by default (a proven optimum within the time limit; the reference uses 5e-3 for 3 h on
200-class problems), ``TimeLimit`` and ``Threads`` = workers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from qpmcli.contracts import Selection, SelectionProblem
from qpmcli.errors import SelectionError

_SIZE_LIMIT_ERRNO = 10010  # GRB_ERROR_SIZE_LIMIT_EXCEEDED


def _gurobipy():
    try:
        import gurobipy
    except ImportError:
        raise SelectionError('the gurobi selector needs gurobipy: pip install "qpm[gurobi]" (a Gurobi licence '
                             'beyond the size-limited pip licence is needed for large problems)') from None
    return gurobipy


def solve_gurobi(inst, *, time_limit: float = 60.0, workers: int = 2, seed: int = 0, mip_gap: float = 0.0,
                 start: np.ndarray | None = None, forms: tuple[tuple[str, str], ...] | None = None) -> dict[str, Any]:
    """Solve a :class:`qpm_plugins.selectors.qpm.QpmInstance` with Gurobi; returns S, W, objective, bound, status.

    ``forms``: the (links, pairs) model forms to try in order, strongest first: links ``"full"`` (x <= s per entry) or
    ``"aggregated"``; pairs ``"pairs"`` (one y per pair) or ``"glover"``. The first one that the licence accepts is
    solved. The returned objective is recomputed exactly from the integer solution.
    """
    gp = _gurobipy()
    n, C = inst.n, inst.C
    forms = forms or (("full", "pairs"), ("full", "glover"), ("aggregated", "pairs"), ("aggregated", "glover"))
    t0 = time.perf_counter()
    last_err: Exception | None = None
    for links, pairs_form in forms:
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        m = gp.Model("qpm", env=env)
        try:
            built = _build(gp, m, inst, links, pairs_form, start)
            m.Params.TimeLimit = max(float(time_limit) - (time.perf_counter() - t0), 0.01)
            m.Params.Threads = max(1, int(workers))
            m.Params.Seed = int(seed) % 2_000_000_000
            m.Params.MIPGap = float(mip_gap)
            m.Params.LazyConstraints = 1
            m.Params.PreCrush = 1
            m.optimize(built["callback"])
        except gp.GurobiError as exc:
            m.dispose()
            env.dispose()
            if exc.errno == _SIZE_LIMIT_ERRNO:
                last_err = exc
                continue
            raise SelectionError(f"gurobi failed: {exc}") from None
        try:
            if m.SolCount == 0:
                raise SelectionError(f"gurobi found no feasible selection in {time_limit:g} s "
                                     f"(status {m.Status}); raise --time-limit")
            sv = np.array([built["s"][f].X for f in range(n)])
            S = np.flatnonzero(np.isclose(sv, 1.0, rtol=1e-5, atol=1e-8))  # the reference's read-out
            x = built["x"]
            W = np.zeros((C, len(S)), dtype=bool)
            for j, f in enumerate(S):
                for c in range(C):
                    W[c, j] = x[f, c].X > 0.5
            return {"S": S, "W": W, "objective": inst.value(S, W), "bound": float(m.ObjBound),
                    "grb_status": int(m.Status), "grb_objective": float(m.ObjVal),
                    "model_form": f"{links}+{pairs_form}",
                    "variables": int(m.NumVars), "constraints": int(m.NumConstrs), "lazy_cuts": built["cuts"][0],
                    "nodes": float(m.NodeCount), "seconds": time.perf_counter() - t0}
        finally:
            m.dispose()
            env.dispose()
    raise SelectionError(f"the selection model is too large for this Gurobi licence ({last_err}); use the qpm "
                         f"selector or a full licence")


def _build(gp, m, inst, links: str, pairs_form: str, start: np.ndarray | None) -> dict[str, Any]:
    from qpm_plugins.selectors.qpm import packing_cuts

    GRB = gp.GRB
    n, C, k, K = inst.n, inst.C, inst.k, inst.K
    s = m.addVars(n, vtype=GRB.BINARY, name="s")
    x = m.addVars(n, C, vtype=GRB.BINARY, name="x")
    m.addConstr(s.sum() == K)
    for c in range(C):
        m.addConstr(gp.quicksum(x[f, c] for f in range(n)) == k)
    if links == "full":
        for f in range(n):
            for c in range(C):
                m.addConstr(x[f, c] <= s[f])
    else:
        cap = min(C, math.comb(K - 1, k - 1))
        for f in range(n):
            m.addConstr(gp.quicksum(x[f, c] for c in range(C)) <= cap * s[f])
    obj = gp.LinExpr()
    obj.addTerms([float(inst.coef[f, c]) for f in range(n) for c in range(C)], [x[f, c] for f in range(n)
                                                                                 for c in range(C)])
    obj.addTerms([float(b) for b in inst.bonus], [s[f] for f in range(n)])
    if len(inst.pairs):
        if pairs_form == "pairs":
            for (f, g), w in zip(inst.pairs.tolist(), inst.pair_w.tolist(), strict=True):
                y = m.addVar(lb=0.0, ub=1.0)
                m.addConstr(y >= s[f] + s[g] - 1)
                obj.addTerms(-w, y)
        else:
            nb: dict[int, list[tuple[int, float]]] = {}
            for (f, g), w in zip(inst.pairs.tolist(), inst.pair_w.tolist(), strict=True):
                nb.setdefault(f, []).append((g, w))
            for f, lst in nb.items():
                p = m.addVar(lb=0.0)
                tot = sum(w for _, w in lst)
                m.addConstr(p >= gp.quicksum(w * s[g] for g, w in lst) - tot * (1 - s[f]))
                obj.addTerms(-1.0, p)
    m.setObjective(obj, GRB.MAXIMIZE)
    if start is not None and len(start) == K:
        from qpm_plugins.selectors.qpm import assign

        S0 = np.sort(np.asarray(start, dtype=np.int64))
        W0 = assign(inst, S0)  # a complete start: lazy constraints reject most of Gurobi's own first solutions
        on = set(S0.tolist())
        for f in range(n):
            s[f].Start = 1.0 if f in on else 0.0
        for c in range(C):
            chosen = set(S0[W0[c]].tolist())
            for f in range(n):
                x[f, c].Start = 1.0 if f in chosen else 0.0
    cuts = [0]
    keys = [(f, c) for f in range(n) for c in range(C)]

    def packing_cut(model, U: tuple[int, ...], gamma: list[int], add) -> None:
        cap = math.comb(len(U), k)
        add(gp.quicksum(x[f, c] for c in gamma for f in U) <= len(gamma) * (k - 1) + min(len(gamma), cap))
        cuts[0] += 1

    def separate(xv: dict, add, max_cuts: int) -> None:
        """Set-packing cuts (:func:`qpm.packing_cuts`, with |U| up to k + 3) for the fractional x."""
        X = np.zeros((n, C))
        for (f, c) in keys:
            X[f, c] = xv[f, c]
        for U, gamma, _ in packing_cuts(X, k, K, inst.coef, max_cuts=max_cuts, max_extra=3):
            packing_cut(None, U, gamma, add)

    def callback(model, where) -> None:
        if where == GRB.Callback.MIPSOL:
            xv = model.cbGetSolution(x)
            groups: dict[tuple[int, ...], list[int]] = {}
            for c in range(C):
                F = tuple(f for f in range(n) if xv[f, c] > 0.5)
                groups.setdefault(F, []).append(c)
            for F, cls in groups.items():
                if len(cls) > 1:  # classes sharing F: at most one of them may keep it (exact lazy constraint)
                    packing_cut(model, F, cls, model.cbLazy)
        elif where == GRB.Callback.MIPNODE and model.cbGet(GRB.Callback.MIPNODE_STATUS) == GRB.OPTIMAL:
            if model.cbGet(GRB.Callback.MIPNODE_NODCNT) < 20_000:
                separate(model.cbGetNodeRel(x), model.cbCut, 40)

    return {"s": s, "x": x, "callback": callback, "cuts": cuts}


class GurobiSelector:
    """QPM on Gurobi (optional extra ``qpm[gurobi]``): same instance and objective as ``qpm``, proven optima."""

    name = "gurobi"
    iterations = 1

    def __init__(self, mip_gap: float = 0.0) -> None:
        self.mip_gap = mip_gap

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        _gurobipy()  # fail fast, before the clique search
        from qpm_plugins.selectors.qpm import OPT_TOL, gap_of, make_instance

        t0 = time.perf_counter()
        inst = make_instance(problem, n_features, per_class)
        start = np.asarray(inst.clique[:n_features]) if len(inst.clique) >= n_features else None
        if previous is not None and len(previous.features) == n_features:
            start = np.asarray(previous.features)
        remaining = max(time_limit - (time.perf_counter() - t0), 0.5)
        res = solve_gurobi(inst, time_limit=remaining, workers=workers, seed=seed, mip_gap=self.mip_gap,
                           start=start)
        bound = max(res["bound"], res["objective"])
        gap = gap_of(res["objective"], bound)
        return Selection(
            features=res["S"].astype(np.int64), weight=res["W"].astype(np.float64), bias=None, trainable_norm=False,
            objective=res["objective"], bound=bound, gap=gap, status="OPTIMAL" if gap <= OPT_TOL else "FEASIBLE",
            seconds=time.perf_counter() - t0, solver="gurobi",
            params={"n_features": n_features, "per_class": per_class, "time_limit": time_limit, "seed": seed,
                    "workers": workers, "mip_gap": self.mip_gap, **inst.threshold_info, "threshold": inst.threshold,
                    "penalised_pairs": int(len(inst.pairs)),
                    **{key: res[key] for key in ("grb_status", "model_form", "variables", "constraints",
                                                 "lazy_cuts", "nodes")}},
        )

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        return {}
