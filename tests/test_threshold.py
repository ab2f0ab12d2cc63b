"""The reference redundancy threshold (METHOD §6.4 / §13 C16): the fast backend equals networkx, step for step.

networkx is the oracle: ``nx.approximation.large_clique_size`` and ``nx.approximation.max_clique`` themselves (no early
stop) and the reference's early-stopped variants on networkx graphs (``ramsey_R2`` called from networkx). Equality is
exact: the same sizes, the same clique sets in the same Python set order, the same sweep steps and thresholds.
"""

from __future__ import annotations

import json
import sys

import networkx as nx
import numpy as np
import pytest

from qpmcli import redundancy as rd
from qpmcli.errors import SelectionError
from qpmcli.selection import (
    THRESHOLD_RULES,
    build_problem,
    clique_threshold,
    disallowed_pairs,
    load_problem_npz,
    load_selection,
    save_selection,
    select,
    synthetic_problem,
)


def random_graph(rng, n, p):
    A = rng.random((n, n)) < p
    A = np.triu(A, 1)
    return A | A.T


def tie_graphs(big=False):
    """Graphs where nearly every choice is a tie: circulants (all degrees equal), complete multipartite graphs,
    disjoint cliques, complements of perfect matchings, with node ids well above small set-table sizes."""
    out = []
    circulants = [(40, (1, 2, 3)), (90, (1, 5, 7, 11)), (100, tuple(range(1, 12, 2)))]
    if big:
        circulants += [(150, tuple(range(1, 30, 2))), (170, tuple(range(1, 60)))]
    for n, offs in circulants:
        A = np.zeros((n, n), dtype=bool)
        for d in offs:
            idx = np.arange(n)
            A[idx, (idx + d) % n] = A[(idx + d) % n, idx] = True
        out.append(A)
    for parts in [(5, 5, 5), (3, 7, 11, 13)] + ([(20, 20, 20, 20, 20, 20, 20)] if big else [(9, 9, 9, 9, 9, 9)]):
        lab = np.repeat(np.arange(len(parts)), parts)
        out.append(lab[:, None] != lab[None, :])
    for parts in [(10, 10, 10), (4, 30, 4, 60)][: 2 if big else 1]:
        lab = np.repeat(np.arange(len(parts)), parts)
        A = lab[:, None] == lab[None, :]
        np.fill_diagonal(A, False)
        out.append(A)
    n = 160 if big else 70
    A = np.ones((n, n), dtype=bool)
    np.fill_diagonal(A, False)
    idx = np.arange(0, n, 2)
    A[idx, idx + 1] = A[idx + 1, idx] = False
    out.append(A)
    return out


def assert_same_heuristics(A, target):
    G = rd.nx_graph(A)
    assert rd.large_clique_size_es(A, target) == rd.nx_large_clique_size_es(G, target)
    fast, ref = rd.approx_max_clique_es(A, target), rd.nx_approx_max_clique_es(G, target)
    assert list(fast) == list(ref)  # same members, same Python set order (the solver seed is clique[:target])
    return fast


# ------------------------------------------------------------------------------------------ the two heuristics
def test_without_early_stop_the_fast_heuristics_are_networkx_itself():
    rng = np.random.default_rng(0)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 5000))  # networkx's ramsey_R2 recursion on dense complements
    try:
        graphs = [random_graph(rng, int(rng.integers(1, 60)), float(rng.random())) for _ in range(30)]
        for A in graphs + tie_graphs()[:5]:
            G = rd.nx_graph(A)
            assert rd.large_clique_size_es(A, None) == nx.approximation.large_clique_size(G)
            assert list(rd.approx_max_clique_es(A, None)) == list(nx.approximation.max_clique(G))
    finally:
        sys.setrecursionlimit(old)


def test_early_stopped_heuristics_equal_networkx_on_random_dense_and_sparse_graphs():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n = int(rng.integers(1, 64))
        p = float(rng.choice([0.03, 0.2, 0.5, 0.8, 0.95, rng.random()]))
        A = random_graph(rng, n, p)
        clique = assert_same_heuristics(A, int(rng.integers(2, max(3, n // 2 + 2))))
        idx = sorted(clique)
        sub = A[np.ix_(idx, idx)]
        assert sub[~np.eye(len(idx), dtype=bool)].all()  # it is a clique


def test_early_stopped_heuristics_equal_networkx_on_tie_graphs():
    for A in tie_graphs():
        for target in (3, 12):
            assert_same_heuristics(A, target)


@pytest.mark.slow
def test_early_stopped_heuristics_equal_networkx_on_large_tie_graphs():
    for A in tie_graphs(big=True):
        for target in (2, 5, 12, 40, 80):
            assert_same_heuristics(A, target)


@pytest.mark.slow
def test_early_stopped_heuristics_equal_networkx_on_medium_graphs():
    rng = np.random.default_rng(2)
    for n, p, target in [(200, 0.9, 30), (230, 0.6, 12), (260, 0.97, 60)]:
        assert_same_heuristics(random_graph(rng, n, p), target)


# ------------------------------------------------------------------------------------------------ the sweep
def test_sweep_arithmetic_is_the_reference_index_rule():
    R = synthetic_problem(40, 12, seed=1, n_samples=400, with_features=False).R
    plan = rd.sweep_plan(R, 8)
    n = 40
    e_star = n ** 2 * 6 / 7
    assert plan.start == int(np.floor(e_star)) and plan.e_star == e_star
    C = R.copy()
    np.fill_diagonal(C, 0)
    assert plan.step == (e_star - (n * n - np.count_nonzero(C))) / 100
    v = np.sort(C.ravel())
    for i in (0, 1, 37, 99, -1, -3):
        assert plan.threshold(i) == v[plan.start - int(i * plan.step)]  # int() truncates toward zero
    assert plan.threshold(-10 ** 6) is None and plan.threshold(10 ** 6) is None
    adj = plan.graph(plan.threshold(5))
    assert not adj.diagonal().any() and (adj == adj.T).all()


def same_result(a, b):
    assert (a.threshold, a.chosen, a.step, a.walk, a.fallback, a.sizes) == (b.threshold, b.chosen, b.step, b.walk,
                                                                             b.fallback, b.sizes)
    assert a.clique == b.clique


@pytest.mark.parametrize("n,C,t,seed", [(30, 10, 6, 0), (48, 16, 10, 1), (64, 20, 12, 2), (80, 30, 20, 3),
                                        (60, 12, 4, 4), (50, 40, 25, 5)])
def test_reference_threshold_fast_equals_networkx_on_synthetic_problems(n, C, t, seed):
    R = synthetic_problem(n, C, seed=seed, n_samples=20 * C, with_features=False).R
    fast = rd.reference_threshold(R, t, backend="fast")
    same_result(fast, rd.reference_threshold(R, t, backend="networkx"))
    assert not fast.fallback and len(fast.clique) >= t
    idx = fast.clique
    sub = R[np.ix_(idx, idx)]
    assert (sub[~np.eye(len(idx), dtype=bool)] < fast.threshold).all()  # pairwise compatible at tau
    assert fast.step == fast.chosen - fast.walk


def test_reference_threshold_fast_equals_networkx_on_a_medium_problem():
    R = synthetic_problem(128, 48, seed=7, n_samples=1440, with_features=False).R
    same_result(rd.reference_threshold(R, 20, backend="fast"), rd.reference_threshold(R, 20, backend="networkx"))


@pytest.mark.slow
def test_reference_threshold_fast_equals_networkx_at_cub_size():
    """512 features, 200 classes, K = 50: the networkx procedure takes minutes on 2 cores."""
    R = synthetic_problem(512, 200, seed=0, with_features=False).R
    fast = rd.reference_threshold(R, 50, backend="fast")
    same_result(fast, rd.reference_threshold(R, 50, backend="networkx"))
    assert len(disallowed_pairs(R, fast.threshold)[0]) > 0


# ----------------------------------------------------------------------------------------- C16's degenerate cases
def two_duplicate_blocks(m):
    """Two blocks of m identical features, orthogonal across blocks: the compatibility graph is K_{m,m}."""
    lab = np.repeat([0, 1], m)
    return (lab[:, None] == lab[None, :]).astype(float)


def test_first_graph_short_uses_the_i0_guard_and_an_exhausted_walk_falls_back():
    R = two_duplicate_blocks(10)
    for backend in rd.BACKENDS:
        res = rd.reference_threshold(R, 10, backend=backend)
        assert res.sizes == {0: 2} and res.chosen == 0  # i = 0 guard (the QPM original would take i - 1 = -1)
        assert res.fallback and res.step == -1 and res.threshold > 1.0  # the reference crashes here
        assert len(disallowed_pairs(R, res.threshold)[0]) == 0


def test_sweep_without_a_stop_chooses_the_last_step_and_skips_unchanged_graphs():
    rng = np.random.default_rng(3)
    n = 30
    R = np.round(rng.uniform(0.05, 1.0, (n, n)), 1)  # few distinct values: many steps repeat a threshold
    R = np.maximum(R, R.T)
    R[:20, :20] = 0.0  # 20 mutually orthogonal features: a 20-clique survives every swept threshold
    np.fill_diagonal(R, 1.0)
    res = rd.reference_threshold(R, 5, backend="fast")
    same_result(res, rd.reference_threshold(R, 5, backend="networkx"))
    assert res.chosen == 99 and min(res.sizes.values()) > 5
    assert len(res.sizes) < 100  # steps whose edge count did not change were skipped


def test_all_identical_features_never_evaluate_a_graph():
    R = np.ones((12, 12))
    for backend in rd.BACKENDS:
        res = rd.reference_threshold(R, 4, backend=backend)
        assert res.sizes == {} and res.chosen == 99 and res.fallback  # empty graphs are all skipped


def test_target_two_and_too_small_targets():
    R = synthetic_problem(14, 6, seed=0, n_samples=200, with_features=False).R
    same_result(rd.reference_threshold(R, 2, backend="fast"), rd.reference_threshold(R, 2, backend="networkx"))
    with pytest.raises(ValueError):
        rd.reference_threshold(R, 1)
    res = clique_threshold(R, 1)
    assert res.threshold == np.inf and res.info()["threshold"] is None


# -------------------------------------------------------------------------------------------- the public API
def test_clique_threshold_rules_and_recorded_facts():
    R = synthetic_problem(60, 20, seed=3, n_samples=600, with_features=False).R
    ref = clique_threshold(R, 12)
    direct = rd.reference_threshold(R, 12)
    assert ref.rule == "reference" and ref.threshold == direct.threshold and ref.clique == direct.clique
    assert ref.step == direct.step and ref.chosen == direct.chosen and ref.clique_size == len(direct.clique)
    bis = clique_threshold(R, 12, rule="greedy-bisect")
    assert bis.rule == "greedy-bisect" and len(bis.clique) == 12
    for res in (ref, bis):
        sub = R[np.ix_(res.clique, res.clique)]
        assert (sub[~np.eye(len(res.clique), dtype=bool)] < res.threshold).all()
        info = res.info()
        assert info == {"threshold_rule": res.rule, "threshold_step": res.step, "threshold": res.threshold,
                        "start_clique_size": res.clique_size, "threshold_fallback": False}
    ref.clique.append(-1)  # callers get copies: the cache is not changed through them
    assert clique_threshold(R, 12).clique == direct.clique
    with pytest.raises(SelectionError, match="unknown threshold rule"):
        clique_threshold(R, 12, rule="nope")
    assert set(THRESHOLD_RULES) == {"reference", "greedy-bisect"}


def test_problem_carries_the_rule_and_the_selection_json_records_it(tmp_path):
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(size=(300, 16)) + np.repeat(rng.normal(size=(6, 16)), 50, axis=0), 0)
    y = np.repeat(np.arange(6), 50)
    with pytest.raises(SelectionError, match="unknown threshold rule"):
        build_problem(X, y, 6, threshold_rule="x")
    prob = build_problem(X, y, 6)
    np.savez(tmp_path / "p.npz", A=prob.A, R=prob.R)
    assert load_problem_npz(tmp_path / "p.npz", threshold_rule="greedy-bisect").threshold_rule == "greedy-bisect"
    for rule in THRESHOLD_RULES:
        prob = build_problem(X, y, 6, threshold_rule=rule)
        sel = select(prob, selector="qpm", n_features=8, per_class=2, time_limit=5, workers=1, progress=False)
        path = save_selection(sel, tmp_path / f"sel-{rule}.json")
        params = json.loads(path.read_text())["params"]
        thr = clique_threshold(prob.R, 8, rule=rule)
        assert params["threshold_rule"] == rule and params["threshold_step"] == thr.step
        assert params["threshold"] == thr.threshold and params["start_clique_size"] == thr.clique_size
        assert params["penalised_pairs"] == len(disallowed_pairs(prob.R, thr.threshold)[0])
        assert load_selection(path).params["threshold_rule"] == rule


def test_cli_select_threshold_rule(qpm, tmp_path):
    prob = synthetic_problem(24, 6, seed=2, n_samples=240, with_features=False)
    np.savez(tmp_path / "problem.npz", A=prob.A, R=prob.R)
    before = (tmp_path / "problem.npz").read_bytes()
    for rule in THRESHOLD_RULES:
        r = qpm(["select", "--problem", "problem.npz", "--features", "6", "--per-class", "2", "--time-limit", "2",
                 "--workers", "1", "--threshold-rule", rule, "--out", f"sel-{rule}.json", "--json"])
        assert r.returncode == 0, r.stderr
        params = json.loads((tmp_path / f"sel-{rule}.json").read_text())["params"]
        assert params["threshold_rule"] == rule
        assert params["threshold"] == clique_threshold(prob.R, 6, rule=rule).threshold
    r = qpm(["select", "--problem", "problem.npz", "--features", "6", "--per-class", "2", "--threshold-rule", "x"])
    assert r.returncode == 2 and "--threshold-rule" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and (tmp_path / "problem.npz").read_bytes() == before
