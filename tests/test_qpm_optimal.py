"""The qpm selector against proven optima (Gurobi, the optional ``gurobi`` selector) and its own guarantees:
exact assignment for a fixed feature set, valid bounds, OPTIMAL only when proven, never worse with more work."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
from qpm_plugins.selectors import qpm as Q
from scipy.optimize import linear_sum_assignment

from qpmcli.errors import SelectionError
from qpmcli.selection import select, synthetic_problem, validate_selection


def instance(n: int, C: int, K: int, k: int, seed: int) -> Q.QpmInstance:
    return Q.make_instance(synthetic_problem(n, C, seed=seed, n_samples=30 * C), K, k)


def gurobi_optimum(inst: Q.QpmInstance, limit: float = 120.0) -> float:
    """Gurobi's proven optimum of the same instance (skips when gurobipy is missing)."""
    pytest.importorskip("gurobipy")
    from qpm_plugins.selectors.gurobi import solve_gurobi

    res = solve_gurobi(inst, time_limit=limit, workers=2, start=inst.clique[: inst.K])
    assert Q.gap_of(res["objective"], max(res["bound"], res["objective"])) <= Q.OPT_TOL, "gurobi did not prove it"
    return res["objective"]


def check_against(res: Q.SolveResult, opt: float) -> None:
    assert res.bound >= opt - 1e-6 * abs(opt)  # the certified bound never cuts off the optimum
    assert res.objective <= opt + 1e-6 * abs(opt)
    assert (res.status == "OPTIMAL") == (res.gap <= Q.OPT_TOL)  # one tolerance for gap and status
    if res.status == "OPTIMAL":
        assert res.objective == pytest.approx(opt, rel=Q.OPT_TOL)


# ------------------------------------------------------------------------------------------- exact assignment
@pytest.mark.parametrize("seed", range(3))
def test_exact_assignment_equals_linear_assignment_over_all_subsets(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        K = int(rng.integers(3, 8))
        k = int(rng.integers(1, min(K, 4)))
        C = int(rng.integers(1, math.comb(K, k) + 1))
        sub = rng.normal(size=K)[None, :] + rng.normal(size=(C, K)) * rng.choice([0.01, 0.3, 1.0])
        W, v = Q.exact_assignment(sub, k)
        subsets = list(itertools.combinations(range(K), k))
        val = np.array([[sub[c, list(t)].sum() for t in subsets] for c in range(C)])
        r, c = linear_sum_assignment(-val)
        assert v == pytest.approx(val[r, c].sum(), abs=1e-9) and v == pytest.approx((sub * W).sum(), abs=1e-9)
        assert (W.sum(1) == k).all() and len({tuple(row) for row in W}) == C


def test_exact_assignment_with_many_subsets_uses_the_closed_collision_set():
    # binom(14, 5) = 2002 subsets: above the all-subsets path, so the collision-closure path runs
    rng = np.random.default_rng(5)
    base = rng.normal(size=14)
    sub = base[None, :] + 0.05 * rng.normal(size=(12, 14))  # near-identical classes: their top sets collide
    W, v = Q.exact_assignment(sub, 5)
    subsets = np.array(list(itertools.combinations(range(14), 5)))
    val = sub[:, subsets].sum(2)
    r, c = linear_sum_assignment(-val)
    assert v == pytest.approx(val[r, c].sum(), abs=1e-9)
    assert len({tuple(row) for row in W}) == 12 and (W.sum(1) == 5).all()


@pytest.mark.parametrize("seed", range(4))
def test_exact_assignment_groups_equal_linear_assignment_over_all_subsets(seed):
    # the collision-group path (binom(14, 5) = 2002 subsets) on several families of near-identical classes, with
    # ties (rounded values) and exact duplicates: each group is closed and solved alone, the total must still be
    # the optimum over all subsets
    rng = np.random.default_rng(100 + seed)
    subsets = np.array(list(itertools.combinations(range(14), 5)))
    for _ in range(25):
        C, families = int(rng.integers(2, 40)), int(rng.integers(1, 6))
        base = rng.normal(size=(families, 14))
        sub = base[rng.integers(0, families, size=C)] + rng.choice([0.0, 0.01, 0.05, 0.3]) * rng.normal(size=(C, 14))
        if rng.random() < 0.3:
            sub = np.round(sub, 1)
        W, v = Q.exact_assignment(sub, 5)
        val = sub[:, subsets].sum(2)
        r, c = linear_sum_assignment(-val)
        assert v == pytest.approx(val[r, c].sum(), abs=1e-9) and v == pytest.approx((sub * W).sum(), abs=1e-9)
        assert (W.sum(1) == 5).all() and len({tuple(row) for row in W}) == C


def test_exact_assignment_stays_exact_and_small_when_collisions_cascade():
    # 200 classes in 3 families of near-identical preferences over 14 features: the closure of the colliding classes
    # takes in most of them (issue 31: one such evaluation at 512 x 1,000 took 119 s and 5.7 GB when every class of a
    # group listed its top-|group| subsets); lists that grow only where needed give the same optimum
    rng = np.random.default_rng(7)
    subsets = np.array(list(itertools.combinations(range(14), 5)))
    base = rng.normal(size=(3, 14))
    sub = base[rng.integers(0, 3, size=200)] + 0.2 * rng.normal(size=(200, 14))
    W, v = Q.exact_assignment(sub, 5)
    val = sub[:, subsets].sum(2)
    r, c = linear_sum_assignment(-val)
    assert v == pytest.approx(val[r, c].sum(), abs=1e-9) and v == pytest.approx((sub * W).sum(), abs=1e-9)
    assert len({tuple(row) for row in W}) == 200 and (W.sum(1) == 5).all()


# ------------------------------------------------------------------------------------------ search guarantees
def more_work(inst: Q.QpmInstance, limits: tuple[int, ...], **kw) -> list[Q.SolveResult]:
    return [Q.solve(inst, time_limit=math.inf, work_limit=w, workers=2, progress=False, **kw) for w in limits]


@pytest.mark.parametrize(("n", "C", "K", "k", "seed"), [(24, 12, 8, 2, 3), (14, 20, 8, 2, 1)])
def test_more_work_never_gives_a_worse_selection(n, C, K, k, seed):
    inst = instance(n, C, K, k, seed)
    runs = more_work(inst, (0, 1, 2), ils_rounds=2)
    objs = [r.objective for r in runs]
    assert all(b >= a - 1e-9 for a, b in zip(objs, objs[1:], strict=False)), objs
    again = more_work(inst, (1,), ils_rounds=2)[0]
    assert again.objective == runs[1].objective  # deterministic: the same work gives the same selection
    np.testing.assert_array_equal(again.S, runs[1].S)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "C", "K", "k", "seed"), [(40, 12, 10, 3, 110), (40, 20, 8, 2, 2),
                                                        (48, 35, 12, 3, 9), (64, 28, 12, 3, 7)])
def test_more_work_never_gives_a_worse_selection_longer_runs(n, C, K, k, seed):
    objs = [r.objective for r in more_work(instance(n, C, K, k, seed), (1, 2, 3, 4))]
    assert all(b >= a - 1e-9 for a, b in zip(objs, objs[1:], strict=False)), objs


def test_an_unproven_search_uses_the_whole_time_limit():
    inst = instance(40, 20, 8, 2, 2)  # distinct sets bind: not proven in 2 s
    res = Q.solve(inst, time_limit=2.0, workers=2, progress=False)
    assert res.status == "OPTIMAL" or res.stats["seconds"] >= 1.9
    traj = res.stats["trajectory"]
    assert all(b[1] >= a[1] for a, b in zip(traj, traj[1:], strict=False))  # the incumbent only improves


def test_final_assignment_is_exact_for_the_chosen_features():
    inst = instance(24, 20, 8, 2, 0)
    res = Q.solve(inst, time_limit=math.inf, work_limit=1, workers=2, progress=False, ils_rounds=2)
    best_W, gain = Q.exact_assignment(inst.coef[res.S].T, inst.k)
    assert res.objective == pytest.approx(inst.value(res.S, best_W), abs=1e-9)
    assert len({tuple(r) for r in res.W}) == inst.C and (res.W.sum(1) == inst.k).all()


# ------------------------------------------------------------------------------------------- proven optima
@pytest.mark.parametrize(("n", "C", "K", "k", "seed"), [(24, 8, 8, 2, 4), (32, 12, 10, 3, 5)])
def test_qpm_proves_gurobis_optimum_on_easy_licence_sized_instances(n, C, K, k, seed):
    inst = instance(n, C, K, k, seed)
    opt = gurobi_optimum(inst)
    res = Q.solve(inst, time_limit=30, workers=2, progress=False)
    check_against(res, opt)
    assert res.status == "OPTIMAL"


def test_qpm_reaches_the_optimum_where_distinct_sets_bind():
    inst = instance(14, 35, 12, 3, 2)  # 35 classes on 12 features, k = 3: classes compete for sets
    opt = gurobi_optimum(inst)
    res = Q.solve(inst, time_limit=10, workers=2, progress=False)
    check_against(res, opt)
    assert res.objective == pytest.approx(opt, rel=Q.OPT_TOL)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "C", "K", "k", "seed"), [(12, 20, 8, 2, 0), (16, 20, 8, 2, 1), (18, 35, 12, 3, 3),
                                                        (24, 35, 12, 3, 6)])
def test_qpm_reaches_the_optimum_on_hard_licence_sized_instances(n, C, K, k, seed):
    inst = instance(n, C, K, k, seed)
    opt = gurobi_optimum(inst, limit=300)
    res = Q.solve(inst, time_limit=60, workers=2, progress=False)
    check_against(res, opt)
    assert res.objective == pytest.approx(opt, rel=Q.OPT_TOL)


# ---------------------------------------------------------------------------------------------- the plugin
def test_gurobi_selector_returns_a_valid_proven_selection():
    pytest.importorskip("gurobipy")
    prob = synthetic_problem(24, 8, seed=4, n_samples=240)
    sel = select(prob, selector="gurobi", n_features=8, per_class=2, time_limit=30, workers=2, progress=False)
    validate_selection(sel, 8, 8, 2)
    inst = Q.make_instance(prob, 8, 2)
    assert sel.objective == pytest.approx(inst.value(sel.features, sel.weight.astype(bool)), abs=1e-9)
    assert sel.status == "OPTIMAL" and sel.solver == "gurobi" and sel.params["model_form"]
    ours = select(prob, selector="qpm", n_features=8, per_class=2, time_limit=30, workers=2, progress=False)
    assert ours.objective == pytest.approx(sel.objective, rel=Q.OPT_TOL)


def test_gurobi_selector_without_gurobipy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gurobipy", None)  # import gurobipy now raises ImportError
    prob = synthetic_problem(12, 4, seed=0, n_samples=120)
    with pytest.raises(SelectionError, match=r'pip install "qpm\[gurobi\]"'):
        select(prob, selector="gurobi", n_features=4, per_class=2, time_limit=5, progress=False)
