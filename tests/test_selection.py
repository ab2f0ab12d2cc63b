"""Selection problem (A, R, clique threshold), the qpm/topk selectors, the selection JSON and `qpm select`."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from qpm_plugins.selectors import qpm as Q

from qpmcli.contracts import Selection, SelectionProblem
from qpmcli.errors import SelectionError
from qpmcli.selection import (
    build_problem,
    clique_threshold,
    compute_A,
    compute_R,
    disallowed_pairs,
    load_selection,
    save_selection,
    select,
    synthetic_problem,
    validate_selection,
)


def brute_force(inst: Q.QpmInstance) -> float:
    """The optimum by enumerating every selection and every distinct assignment (tiny instances only)."""
    best = -math.inf
    subsets = list(itertools.combinations(range(inst.K), inst.k))
    for S in itertools.combinations(range(inst.n), inst.K):
        S = np.array(S)
        fixed = -0.5 * inst.P[np.ix_(S, S)].sum() + inst.bonus[S].sum()
        vals = np.array([[inst.coef[S[list(t)], c].sum() for t in subsets] for c in range(inst.C)])
        for combo in itertools.product(range(len(subsets)), repeat=inst.C):
            if len(set(combo)) == inst.C:
                best = max(best, fixed + sum(vals[c, combo[c]] for c in range(inst.C)))
    return best


def test_A_is_normalised_pearson_correlation_with_class_indicator():
    rng = np.random.default_rng(0)
    X = rng.random((60, 5))
    X[:, 4] = 3.0  # dead feature
    y = np.arange(60) % 3
    A = compute_A(X, y, 3)
    ref = np.array([[np.corrcoef(X[:, f], (y == c).astype(float))[0, 1] for c in range(3)] for f in range(4)])
    ref /= np.abs(ref).max()
    np.testing.assert_allclose(A[:4], ref, atol=1e-12)
    assert np.all(A[4] == 0) and np.abs(A).max() == pytest.approx(1.0)


def test_R_is_clipped_cosine_of_A_rows():
    A = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    R = compute_R(A)
    assert R.shape == (5, 5) and np.allclose(R, R.T)
    assert R[0, 0] == pytest.approx(1.0) and R[0, 1] == pytest.approx(0.0)
    assert R[0, 2] == 0.0  # cos = -1, clipped
    assert R[0, 3] == pytest.approx(1 / math.sqrt(2))
    assert np.all(R[4] == 0)


def test_clique_threshold_returns_a_verified_clique_and_positive_pair_weights():
    prob = synthetic_problem(60, 20, seed=3, n_samples=600)
    res = clique_threshold(prob.R, 12)
    assert len(res.clique) == 12
    sub = prob.R[np.ix_(res.clique, res.clique)]
    assert np.all(sub[~np.eye(12, dtype=bool)] < res.threshold)
    pairs, w = disallowed_pairs(prob.R, res.threshold)
    assert len(pairs) > 0 and np.all(pairs[:, 0] < pairs[:, 1])
    assert np.all(prob.R[pairs[:, 0], pairs[:, 1]] >= res.threshold)
    assert np.all((w > 0) & (w <= 1))


@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_qpm_solves_tiny_instances_to_proven_optimality(seed):
    prob = synthetic_problem(8, 4, seed=seed, rank=3, n_samples=200)
    inst = Q.make_instance(prob, 4, 2)
    res = Q.solve(inst, time_limit=10, seed=0, workers=2, progress=False)
    assert res.objective == pytest.approx(brute_force(inst), abs=1e-6)
    assert res.status == "OPTIMAL" and res.bound >= res.objective - 1e-9 and res.gap <= 1e-6


def test_qpm_optimal_with_forced_duplicates_matches_brute_force():
    # classes 0 and 1 have identical A columns: their top-k sets collide and one must give way
    rng = np.random.default_rng(7)
    A = rng.normal(size=(7, 4))
    A[:, 1] = A[:, 0]
    A /= np.abs(A).max()
    prob = SelectionProblem(A=A, R=compute_R(A))
    inst = Q.make_instance(prob, 4, 2)
    res = Q.solve(inst, time_limit=10, seed=0, workers=2, progress=False)
    rows = {tuple(np.flatnonzero(r)) for r in res.W}
    assert len(rows) == 4
    assert res.objective == pytest.approx(brute_force(inst), abs=1e-6)


@pytest.mark.parametrize("selector", ["qpm", "topk"])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_every_returned_selection_satisfies_all_constraints(selector, seed):
    rng = np.random.default_rng(seed)
    n, C = int(rng.integers(20, 40)), int(rng.integers(8, 30))
    K, k = int(rng.integers(5, 10)), int(rng.integers(2, 4))
    prob = synthetic_problem(n, C, seed=seed, n_samples=30 * C)
    sel = select(prob, selector=selector, n_features=K, per_class=k, time_limit=2, seed=0, workers=2,
                 progress=False)
    validate_selection(sel, C, K, k)
    inst = Q.make_instance(prob, K, k)
    assert sel.objective == pytest.approx(inst.value(sel.features, sel.weight.astype(bool)), abs=1e-6)
    if selector == "qpm":
        assert sel.bound is not None and sel.bound >= sel.objective - 1e-9
        assert sel.gap == pytest.approx((sel.bound - sel.objective) / abs(sel.objective), abs=1e-9)


def test_qpm_beats_or_matches_greedy_and_is_deterministic():
    # the search is one deterministic sequence per seed; a wall-clock limit only decides how far along it the result
    # is taken (on this instance improvements land around 3 s, so two 3 s runs may stop on either side of one), so
    # the repeat is checked with a work limit, which stops at the same point every time
    prob = synthetic_problem(40, 30, seed=5, n_samples=900)
    a = select(prob, selector="qpm", n_features=10, per_class=3, time_limit=3, seed=1, workers=2, progress=False)
    greedy = select(prob, selector="topk", n_features=10, per_class=3, progress=False)
    assert a.objective >= greedy.objective - 1e-9
    inst = Q.make_instance(prob, 10, 3)
    r1, r2 = (Q.solve(inst, time_limit=math.inf, work_limit=1, seed=1, workers=2, progress=False) for _ in range(2))
    np.testing.assert_array_equal(r1.S, r2.S)
    np.testing.assert_array_equal(r1.W, r2.W)
    assert r1.objective == r2.objective and r1.stats["ils_rounds"] == r2.stats["ils_rounds"]


def test_local_search_never_worsens_and_assign_gives_distinct_sets():
    prob = synthetic_problem(80, 40, seed=9, n_samples=1200)
    inst = Q.make_instance(prob, 12, 3)
    S0 = Q.greedy(inst)
    S1 = Q.local_search(inst, S0)
    assert len(np.unique(S1)) == 12
    assert inst.selection_value(S1) >= inst.selection_value(S0) - 1e-9
    W = Q.assign(inst, S1)
    assert (W.sum(1) == 3).all() and len({tuple(r) for r in W}) == 40


def test_assign_untangles_as_many_classes_as_subsets():
    A = np.tile(np.array([[3.0], [2.0], [1.0], [0.5]]), (1, 6))  # 6 identical classes, C(4,2) = 6 subsets
    inst = Q.QpmInstance(coef=A, pairs=np.zeros((0, 2), int), pair_w=np.zeros(0), bonus=np.zeros(4), K=4, k=2)
    W = Q.assign(inst, np.arange(4))
    assert len({tuple(r) for r in W}) == 6 and (W.sum(1) == 2).all()


def test_lp_bound_is_above_the_optimum_of_small_instances():
    prob = synthetic_problem(9, 4, seed=2, rank=3, n_samples=200)
    inst = Q.make_instance(prob, 4, 2)
    opt = brute_force(inst)
    for M in (3, 5, 9):
        assert Q.lp_bound(inst, M) >= opt - 1e-6


def test_clique_cuts_tighten_the_bound_but_never_below_the_optimum():
    # four interchangeable copies of a strong feature: the LP takes each half and pays no penalty
    rng = np.random.default_rng(4)
    coef = rng.normal(size=(8, 4))
    coef[:4] = 10 + 0.1 * rng.normal(size=(4, 4))
    pairs = np.array([(f, g) for f in range(4) for g in range(f + 1, 4)])
    inst = Q.QpmInstance(coef=coef, pairs=pairs, pair_w=np.full(len(pairs), 5.0), bonus=np.zeros(8), K=4, k=2)
    opt = brute_force(inst)
    plain, cut = Q.lp_bound(inst, 8), Q.lp_bound(inst, 8, cut_rounds=20)
    assert opt - 1e-6 <= cut < plain - 1e-3


@pytest.mark.parametrize("seed", range(6))
def test_clique_penalty_floor_is_a_convex_lower_bound_that_is_exact_where_convex(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 9))
    w = rng.uniform(0.2, 1.0, size=(L, L)) ** (1 + 3 * rng.random())  # skewed weights: exact phi not convex
    P = np.triu(w, 1) + np.triu(w, 1).T
    T = [int(t) for t in rng.permutation(L)]
    phi = Q.clique_penalty_floor(T, P)
    least = [min(0.5 * P[np.ix_(sub, sub)].sum() for sub in itertools.combinations(range(L), m))
             for m in range(L + 1)]
    assert np.all(phi <= np.array(least) + 1e-9)  # valid at every size
    assert np.all(np.diff(phi, 2) >= -1e-9)  # convex, so every secant is a valid cut
    assert phi[0] == 0 and phi[1] == 0 and phi[2] == pytest.approx(least[2])  # the cheapest pair is exact
    assert phi[L] == pytest.approx(least[L])  # all members: exactly all pairs


def test_clique_cuts_with_uneven_weights_stay_valid_on_random_instances():
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        coef = rng.normal(size=(8, 4))
        coef[:5] += 4
        pairs = np.array([(f, g) for f in range(6) for g in range(f + 1, 6) if rng.random() < 0.8])
        inst = Q.QpmInstance(coef=coef, pairs=pairs, pair_w=rng.uniform(0.1, 3.0, len(pairs)), bonus=np.zeros(8),
                             K=4, k=2)
        assert Q.lp_bound(inst, 8, cut_rounds=20) >= brute_force(inst) - 1e-6


@pytest.mark.parametrize(("K", "k", "C", "n", "msg"), [
    (5, 6, 4, 10, "exceeds --features"),
    (12, 3, 4, 10, "exceeds the 10 features"),
    (4, 3, 5, 10, "distinct feature sets"),
    (0, 1, 4, 10, "at least 1"),
])
def test_infeasible_requests_fail_before_solving(K, k, C, n, msg):
    A = np.random.default_rng(0).normal(size=(n, C))
    with pytest.raises(SelectionError, match=msg):
        select(A, compute_R(A), n_features=K, per_class=k, time_limit=1, progress=False)


def test_validate_selection_rejects_broken_selections():
    W = np.zeros((3, 4))
    W[:, :2] = 1
    sel = Selection(features=np.array([1, 2, 5, 7]), weight=W)
    with pytest.raises(SelectionError, match="same feature set"):
        validate_selection(sel, 3, 4, 2)
    W2 = W.copy()
    W2[0, 2] = 1
    with pytest.raises(SelectionError, match="class 0 has 3"):
        validate_selection(Selection(features=np.array([1, 2, 5, 7]), weight=W2), 3, 4, 2)
    with pytest.raises(SelectionError, match="sorted"):
        validate_selection(Selection(features=np.array([2, 1, 5, 7]), weight=W), 3, 4, 2)


def test_selection_json_roundtrip(tmp_path):
    prob = synthetic_problem(20, 6, seed=1, n_samples=200)
    sel = select(prob, n_features=6, per_class=2, time_limit=2, workers=2, progress=False)
    path = save_selection(sel, tmp_path / "sel.json", class_names=[f"c{i}" for i in range(6)])
    data = json.loads(path.read_text())
    assert set(data) >= {"features", "weight", "objective", "bound", "gap", "status", "seconds", "solver", "params"}
    assert data["features"] == sorted(data["features"]) and np.array(data["weight"]).shape == (6, 6)
    back = load_selection(path)
    np.testing.assert_array_equal(back.features, sel.features)
    np.testing.assert_array_equal(back.weight, sel.weight)
    assert back.objective == sel.objective and back.status == sel.status
    with pytest.raises(SelectionError, match="not found"):
        load_selection(tmp_path / "missing.json")


def test_build_problem_keeps_features_for_glm_selectors():
    rng = np.random.default_rng(0)
    prob = build_problem(rng.random((50, 6)), np.arange(50) % 5, 5)
    assert prob.A.shape == (6, 5) and prob.R.shape == (6, 6) and prob.features.shape == (50, 6)


def test_cli_select_problem_file_and_run_dir(qpm, tmp_path):
    prob = synthetic_problem(24, 6, seed=2, n_samples=240)
    np.savez(tmp_path / "problem.npz", A=prob.A, R=prob.R, class_names=np.array([f"c{i}" for i in range(6)]))
    r = qpm(["select", "--problem", "problem.npz", "--features", "6", "--per-class", "2", "--time-limit", "2",
             "--workers", "2", "--out", "sel.json", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["features"]) == 6 and out["status"] in {"OPTIMAL", "FEASIBLE"}
    saved = json.loads((tmp_path / "sel.json").read_text())
    assert saved["class_names"] == [f"c{i}" for i in range(6)]
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "dense_features.npz", features=prob.features, labels=prob.labels)
    r = qpm(["select", str(run), "--selector", "topk", "--features", "6", "--per-class", "2"])
    assert r.returncode == 0, r.stderr  # a run's own selection.json is only replaced with --force
    assert len(json.loads((run / "selection-topk.json").read_text())["features"]) == 6


def test_cli_select_errors_are_one_line_exit_2(qpm, tmp_path):
    r = qpm(["select", "--problem", "nope.npz"])
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    A = np.random.default_rng(0).normal(size=(10, 4))
    np.savez(tmp_path / "p.npz", A=A, R=compute_R(A))
    r = qpm(["select", "--problem", "p.npz", "--features", "4", "--per-class", "5"])
    assert r.returncode == 2 and "exceeds --features" in r.stderr
    r = qpm(["select"])
    assert r.returncode == 2 and "either a run directory or --problem" in r.stderr
    (tmp_path / "notes.npz").write_text("not an archive")
    r = qpm(["select", "--problem", "notes.npz"])
    assert r.returncode == 2 and "is not a numpy .npz archive" in r.stderr and "pickle" not in r.stderr
    np.savez(tmp_path / "objects.npz", A=np.array([{"evil": 1}], dtype=object), R=np.eye(1))
    r = qpm(["select", "--problem", "objects.npz"])
    assert r.returncode == 2 and "object arrays are refused" in r.stderr


def test_problem_from_run_takes_class_count_from_run_metadata(tmp_path):
    from qpmcli.selection import problem_from_run

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "dense_features.npz", features=rng.random((40, 7)), labels=np.arange(40) % 3)
    (tmp_path / "model.json").write_text(json.dumps({"class_names": ["a", "b", "c", "d"]}))
    prob = problem_from_run(tmp_path)
    assert prob.A.shape == (7, 4) and prob.class_names == ["a", "b", "c", "d"]
    assert np.all(prob.A[:, 3] == 0)  # class without samples: no correlation
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(SelectionError, match="dense_features.npz not found"):
        problem_from_run(empty)


def test_iterated_local_search_is_deterministic_and_never_worse_than_local_search():
    prob = synthetic_problem(60, 30, seed=6, n_samples=900)
    inst = Q.make_instance(prob, 12, 3)
    S0 = Q.greedy(inst)
    base = inst.selection_value(Q.local_search(inst, S0))
    runs = [Q.iterated_local_search(inst, S0, np.random.default_rng(3), rounds=20, deadline=math.inf)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    S, v = runs[0]
    assert len(np.unique(S)) == 12 and v == pytest.approx(inst.selection_value(S))
    assert v >= base - 1e-9
    # kicks larger than K // 3 are capped: a tiny instance still works
    tiny = Q.make_instance(synthetic_problem(8, 4, seed=0, rank=3, n_samples=200), 4, 2)
    S_t, _ = Q.iterated_local_search(tiny, Q.greedy(tiny), np.random.default_rng(0), rounds=8, deadline=math.inf)
    assert len(np.unique(S_t)) == 4


# wall-clock measurements in a selection's JSON: everything else is the result of the search
CLOCK_FIELDS = {"seconds", "setup_seconds", "time_to_best", "step_seconds", "peak_rss_growth_mib", "peak_rss_mib",
                "lp_seconds", "sdp_seconds"}


def _without_clock(doc):
    if isinstance(doc, dict):
        return {k: (([row[1:] for row in v]) if k == "trajectory" else _without_clock(v))
                for k, v in doc.items() if k not in CLOCK_FIELDS}
    if isinstance(doc, list):
        return [_without_clock(v) for v in doc]
    return doc


def test_the_demo_selection_is_work_limited_and_gives_identical_json_twice(tmp_path):
    """Issue 29: the demo's selection stops after DEMO_WORK_LIMIT cycles, not at a clock, so two selections of one
    problem with the demo's request (selector, options, sizes, seed, workers; different generous time limits) write
    the same selection JSON, apart from the wall-clock measurements. On this problem a search stopped one cycle
    earlier writes another JSON (unproven, a higher bound), i.e. a clock would decide what the JSON says."""
    from dataclasses import replace

    from qpmcli.demo import DEMO_TIME_LIMIT, DEMO_WORK_LIMIT, demo_requests

    req = demo_requests(quick=True)["qpm"]
    assert req.selector == "qpm" and req.selector_options == {"work_limit": DEMO_WORK_LIMIT}
    assert req.time_limit == DEMO_TIME_LIMIT >= 60 and (req.n_selected, req.per_class) == (20, 5)
    prob = synthetic_problem(40, 30, seed=4, n_samples=300)

    def selection_json(req, name):
        sel = select(prob, selector=req.selector, n_features=req.n_selected, per_class=req.per_class,
                     time_limit=req.time_limit, seed=req.seed % 2**31, workers=req.workers,
                     selector_options=req.selector_options, progress=False)
        save_selection(sel, tmp_path / name)
        doc = json.loads((tmp_path / name).read_text())
        doc["params"].pop("time_limit")
        return doc

    first = selection_json(req, "first.json")
    again = selection_json(replace(req, time_limit=10 * req.time_limit), "again.json")
    assert first["params"]["cycles"] == DEMO_WORK_LIMIT and first["params"]["bound_method"] == "lp"
    assert first["params"]["selector_options"] == {"work_limit": DEMO_WORK_LIMIT}
    assert _without_clock(first) == _without_clock(again)
    earlier = selection_json(replace(req, selector_options={"work_limit": DEMO_WORK_LIMIT - 1}), "earlier.json")
    assert (earlier["status"], first["status"]) == ("FEASIBLE", "OPTIMAL") and earlier["bound"] > first["bound"]


def test_work_limit_is_a_checked_qpm_selector_option(qpm, tmp_path):
    np.savez(tmp_path / "problem.npz", A=np.eye(6)[:, :4] + 0.1, R=np.zeros((6, 6)))
    for value, message in (("0", "option 'work_limit' must be a positive integer"),
                           ("two", "--selector-option work_limit")):
        r = qpm(["select", "--problem", str(tmp_path / "problem.npz"), "--features", "4", "--per-class", "2",
                 "--selector-option", f"work_limit={value}", "--out", str(tmp_path / "sel.json")])
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "sel.json").exists()
    with pytest.raises(SelectionError, match="work_limit"):
        select(synthetic_problem(12, 4, seed=0), n_features=6, per_class=2, selector_options={"work_limit": 1.5})
