"""The certified semidefinite bound (plugins/selectors/qpm/sdp.py): the model holds every selection, any dual gives a
valid bound, and the bound from SCS is never below the proven optimum of small problems."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from qpm_plugins.selectors import qpm as Q
from qpm_plugins.selectors.qpm import bounds as B
from qpm_plugins.selectors.qpm import sdp as D
from test_selection import brute_force  # exact optimum (every selection, every distinct assignment)

from qpmcli.errors import SelectionError
from qpmcli.selection import synthetic_problem


def topk_value(inst: Q.QpmInstance, S: np.ndarray) -> float:
    """Z of selection S when every class takes its top-k in S (distinct sets not required)."""
    top = -np.sort(-inst.coef[S], axis=0)[: inst.k]
    return float(top.sum() - 0.5 * inst.P[np.ix_(S, S)].sum() + inst.bonus[S].sum())


def best_without_distinct_sets(inst: Q.QpmInstance) -> float:
    """max over all selections of the top-k value: the optimum without distinct class sets (>= the true optimum)."""
    return max(topk_value(inst, np.array(S)) for S in itertools.combinations(range(inst.n), inst.K))


def random_instance(seed: int, n: int = 9, C: int = 4, K: int = 4, k: int = 2) -> Q.QpmInstance:
    """Clusters of near-duplicate strong features with uneven penalties: where the LP is loose."""
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=(n, C))
    coef[: n // 2] += rng.uniform(2, 6)
    pairs = np.array([(f, g) for f in range(n) for g in range(f + 1, n) if rng.random() < 0.5]).reshape(-1, 2)
    w = rng.uniform(0.1, 4.0, len(pairs))
    bonus = rng.normal(size=n) if seed % 3 == 0 else np.zeros(n)
    return Q.QpmInstance(coef=coef, pairs=pairs, pair_w=w, bonus=bonus, K=K, k=k)


def selection_point(model: D.ConicModel, inst: Q.QpmInstance, S: np.ndarray, M: int) -> np.ndarray:
    """The model's variable vector for selection S: s = 1_S, X = s s^T, x = each class's top-k in S, z the rest."""
    n, C, k = inst.n, inst.C, inst.k
    s = np.zeros(n)
    s[S] = 1.0
    X = np.outer(s, s)
    iu, ju = np.triu_indices(n, 1)
    cand = Q.candidates(inst, M)
    x = np.zeros((C, min(M, n)))
    z = np.zeros(C)
    for c in range(C):
        top = S[np.argsort(-inst.coef[S, c], kind="stable")[:k]]
        for f in top:
            hit = np.flatnonzero(cand[c] == f)
            if len(hit):
                x[c, hit[0]] = 1.0
            else:
                z[c] += 1.0
    parts = [s, X[iu, ju], x.reshape(-1)] + ([z] if M < n else [])
    return np.concatenate(parts)


@pytest.mark.parametrize("seed", range(6))
def test_every_selection_is_a_feasible_point_of_the_relaxation_with_at_least_its_value(seed):
    inst = random_instance(seed)
    for M in (3, inst.n):
        model = D.build_model(inst, M)
        z, lin, m = model.cone["z"], model.cone["l"], model.cone["s"][0]
        for S in itertools.combinations(range(inst.n), inst.K):
            S = np.array(S)
            v = selection_point(model, inst, S, M)
            assert np.all(v >= model.lower) and np.all(v <= model.upper)
            slack = model.b - model.A @ v
            np.testing.assert_allclose(slack[:z], 0.0, atol=1e-9)
            assert slack[z:z + lin].min() >= -1e-9
            assert np.linalg.eigvalsh(D._unvec(slack[z + lin:], m))[0] >= -1e-9
            assert -model.c @ v >= topk_value(inst, S) - 1e-9


def test_svec_matches_the_trace_inner_product():
    rng = np.random.default_rng(0)
    m = 5
    A, B = rng.normal(size=(2, m, m))
    A, B = A + A.T, B + B.T
    a, b = D._vec(A), D._vec(B)
    assert a @ b == pytest.approx(np.trace(A @ B))
    np.testing.assert_allclose(D._unvec(a, m), A)
    il, jl = np.tril_indices(m)
    assert sorted(D._svec_index(m, il, jl).tolist()) == list(range(m * (m + 1) // 2))


@pytest.mark.parametrize("seed", range(4))
def test_any_dual_vector_certifies_a_valid_bound(seed):
    """The certificate needs no convergence: random, scaled and zero duals all give bounds >= the optimum."""
    inst = random_instance(seed)
    opt = best_without_distinct_sets(inst)
    model = D.build_model(inst, 4)
    rng = np.random.default_rng(seed)
    for scale in (0.0, 0.01, 1.0, 100.0):
        y = scale * rng.normal(size=model.b.shape)
        assert D.certify(model, y) >= opt - 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_certified_bound_is_never_below_the_optimum(seed):
    inst = random_instance(seed, n=8 + seed % 3, C=3 + seed % 2)
    opt = best_without_distinct_sets(inst)
    for M in (3, inst.n):
        bound, info = D.sdp_bound(inst, time_limit=30, M=M, eps=1e-6)
        assert bound >= opt - 1e-9
        assert info["iterations"] > 0 and info["time"] >= 0 and info["memory"] >= 0 and info["status"]
        # converged: the certificate is within solver tolerance of SCS's own objective
        assert bound == pytest.approx(info["scs_objective"], rel=1e-4, abs=1e-3)
        early, _ = D.sdp_bound(inst, max_iters=25, M=M)  # stopped long before convergence
        assert early >= opt - 1e-9


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_certified_bound_is_above_the_proven_optimum_with_distinct_sets(seed):
    prob = synthetic_problem(8, 4, seed=seed, rank=3, n_samples=200)
    inst = Q.make_instance(prob, 4, 2)
    opt = brute_force(inst)
    for M in (3, 8):
        assert D.sdp_bound(inst, time_limit=30, M=M, eps=1e-6)[0] >= opt - 1e-9


def test_sdp_is_tighter_than_the_lp_where_redundant_copies_make_the_lp_loose():
    # four interchangeable copies of a strong feature: the McCormick LP takes each half and pays no penalty
    rng = np.random.default_rng(4)
    coef = rng.normal(size=(8, 4))
    coef[:4] = 10 + 0.1 * rng.normal(size=(4, 4))
    pairs = np.array([(f, g) for f in range(4) for g in range(f + 1, 4)])
    inst = Q.QpmInstance(coef=coef, pairs=pairs, pair_w=np.full(len(pairs), 5.0), bonus=np.zeros(8), K=4, k=2)
    opt = brute_force(inst)
    sdp, _ = D.sdp_bound(inst, time_limit=30, eps=1e-6)
    assert opt - 1e-9 <= sdp < Q.lp_bound(inst, 8) - 1.0


def test_sdp_bound_is_usually_at_most_the_lp_bound_on_random_instances():
    wins = 0
    for seed in range(10):
        inst = random_instance(100 + seed, n=10, C=4, K=5, k=2)
        sdp, _ = D.sdp_bound(inst, time_limit=30, eps=1e-6)
        lp = Q.lp_bound(inst, inst.n)
        wins += sdp <= lp + 1e-6
    assert wins >= 8


def test_a_time_limit_shorter_than_the_setup_gives_no_bound_instead_of_a_wrong_one():
    inst = random_instance(0)
    bound, info = D.sdp_bound(inst, time_limit=0.0)
    assert bound == math.inf and info["iterations"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_tightened_duals_certify_lower_but_still_valid_bounds(seed):
    import scs

    inst = random_instance(20 + seed, n=10, C=4, K=5, k=2)
    opt = best_without_distinct_sets(inst)
    model = D.build_model(inst, 4)
    rng = np.random.default_rng(seed)
    for y in (rng.normal(size=model.b.shape), np.zeros(model.b.shape)):  # arbitrary duals stay valid
        assert D.certify(model, D.tighten_dual(model, y)) >= opt - 1e-9
    sol = scs.SCS({"A": model.A, "b": model.b, "c": model.c}, model.cone, max_iters=30, verbose=False).solve()
    plain = D.certify(model, sol["y"])
    tight = D.certify(model, D.tighten_dual(model, sol["y"]))
    assert opt - 1e-9 <= tight <= plain + 1e-9


def test_line_min_is_the_exact_minimiser_of_the_box_charge():
    rng = np.random.default_rng(0)
    tested = 0
    while tested < 20:
        a, rr = rng.normal(size=(2, 7))
        lo, up = np.zeros(7), rng.uniform(0.5, 3, 7)
        beta = float(rng.normal())
        # slopes as t -> -inf and +inf; a bounded minimum needs the first < 0 < the second (as in a feasible model)
        if not (beta - (a * np.where(a > 0, up, lo)).sum() < 0 < beta - (a * np.where(a > 0, lo, up)).sum()):
            continue
        tested += 1

        def phi(t, a=a, rr=rr, lo=lo, up=up, beta=beta):
            t = np.asarray(t, dtype=float)[..., None]
            return beta * t[..., 0] - np.minimum((rr + a * t) * lo, (rr + a * t) * up).sum(-1)

        t = D._line_min(a, rr, lo, up, beta)
        assert phi(t) <= phi(np.linspace(-50, 50, 100001)).min() + 1e-9


def test_sdp_bound_source_steps_never_raise_the_bound_and_finish_when_converged():
    import time

    inst = random_instance(7, n=10, C=4, K=5, k=2)
    opt = best_without_distinct_sets(inst)
    src = D.SdpBound(inst, eps=1e-6, chunk_seconds=0.5)
    assert src.name == "sdp" and src.bound == math.inf and not src.done
    seen = []
    for _ in range(200):
        seen.append(src.step(time.perf_counter() + 60))
        if src.done:
            break
    assert src.done and src.model is None  # converged; the workspace is released
    assert all(b >= opt - 1e-9 for b in seen) and all(b2 <= b1 for b1, b2 in zip(seen, seen[1:], strict=False))
    assert src.info["chunks"] == len(seen) and src.step(time.perf_counter() + 60) == seen[-1]


def test_concurrent_source_runs_beside_the_caller_and_its_final_bound_is_valid():
    import threading
    import time

    inst = random_instance(4, n=10, C=4, K=5, k=2)
    opt = best_without_distinct_sets(inst)
    src = B.ConcurrentSource(D.SdpBound(inst, eps=1e-7, chunk_seconds=0.2))
    assert not src.done and src.bound == math.inf
    t0 = time.perf_counter()
    src.step(t0 + 30)
    assert time.perf_counter() - t0 < 0.5 and src.done  # returns at once; the thread does the rest
    assert any(t.name == "qpm-sdp-bound" for t in threading.enumerate())
    final = src.finish()
    assert not any(t.name == "qpm-sdp-bound" for t in threading.enumerate())
    assert final == src.bound >= opt - 1e-9 and math.isfinite(final) and src.error is None
    assert src.source.info["chunks"] >= 1 and src.seconds > 0


def test_the_search_is_the_same_whichever_bound_runs_beside_it():
    prob = synthetic_problem(40, 12, seed=3, n_samples=360)
    inst = Q.make_instance(prob, 10, 3)
    runs = {}
    for name, sources in (("lp", [Q.LpBound(inst, Q.default_candidates(inst))]),
                          ("sdp", [B.ConcurrentSource(D.SdpBound(inst))])):
        runs[name] = Q.solve(inst, time_limit=120, work_limit=2, seed=1, workers=1, progress=False,
                             use_cpsat=False, exact_model=False, bound_sources=sources)
    lp, sdp = runs["lp"], runs["sdp"]
    assert lp.stats["cycles"] == sdp.stats["cycles"] == 2 and lp.stats["ils_rounds"] == sdp.stats["ils_rounds"]
    np.testing.assert_array_equal(lp.S, sdp.S)
    assert lp.objective == sdp.objective and sdp.bound >= sdp.objective and math.isfinite(sdp.bound)


def test_a_failing_background_bound_leaves_the_selection_running_and_says_why():
    class Broken:
        name, bound, done, steps, seconds = "sdp", math.inf, False, 0, 0.0

        def step(self, deadline):
            raise MemoryError("no room for the PSD block")

    src = B.ConcurrentSource(Broken())
    src.step(math.inf)
    assert src.finish() == math.inf and src.error == "MemoryError: no room for the PSD block"
    stats = B.bound_stats("sdp", [src], {}, 10.0)
    assert stats["sdp_error"] == "MemoryError: no room for the PSD block" and stats["bound_from"] == "objective"


def test_auto_bound_takes_the_sdp_only_for_large_problems_with_time_for_it():
    big = Q.QpmInstance(coef=np.zeros((512, 200)), pairs=np.zeros((0, 2), int), pair_w=np.zeros(0),
                        bonus=np.zeros(512), K=50, k=5)
    small = random_instance(0)
    assert B.choose_bound("auto", big, 120.0) == "sdp"
    assert B.choose_bound("auto", big, 30.0) == "lp"
    assert B.choose_bound("auto", small, 600.0) == "lp"
    assert B.choose_bound("sdp", small, 1.0) == "sdp" and B.choose_bound("lp", big, 600.0) == "lp"
    with pytest.raises(ValueError, match="lp, sdp, auto"):
        B.choose_bound("best", big, 60.0)
    assert [s.name for s in B.bound_sources("auto", big, 100, 120.0)] == ["sdp"]


@pytest.mark.parametrize("bound", ["lp", "sdp"])
def test_qpm_selector_records_which_bound_it_used_and_the_bound_stays_valid(bound):
    from qpm_plugins.selectors.qpm import QpmSelector

    prob = synthetic_problem(8, 4, seed=0, rank=3, n_samples=200)
    sel = QpmSelector(bound=bound).select(prob, n_features=4, per_class=2, time_limit=20, progress=False)
    p = sel.params
    assert p["bound_option"] == bound and p["bound_method"] == bound and p[f"{bound}_seconds"] > 0
    assert p["bound_from"] in (bound, "cpsat", "objective")
    assert sel.bound >= brute_force(Q.make_instance(prob, 4, 2)) - 1e-6
    if bound == "sdp":
        assert p["sdp"]["chunks"] >= 1 and p["sdp"]["iterations"] > 0
    with pytest.raises(SelectionError, match="option 'bound' must be one of lp, sdp, auto, got 'exact'"):
        QpmSelector(bound="exact")  # checked when the selector is made, before any work


def test_cli_select_bound_flag(qpm, tmp_path):
    import json

    prob = synthetic_problem(8, 4, seed=0, rank=3, n_samples=200)  # proven optimal within seconds: the run ends
    np.savez(tmp_path / "problem.npz", A=prob.A, R=prob.R)
    r = qpm(["select", "--problem", "problem.npz", "--features", "4", "--per-class", "2", "--time-limit", "60",
             "--workers", "2", "--bound", "sdp", "--out", "sel.json", "--json"])
    assert r.returncode == 0, r.stderr
    params = json.loads((tmp_path / "sel.json").read_text())["params"]
    assert params["bound_option"] == "sdp" and params["bound_method"] == "sdp" and params["sdp_seconds"] > 0
    before = (tmp_path / "sel.json").read_bytes()
    r = qpm(["select", "--problem", "problem.npz", "--features", "4", "--per-class", "2", "--bound", "best",
             "--out", "sel.json"])
    assert r.returncode == 2 and "--bound 'best' is not one of lp, sdp, auto" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "sel.json").read_bytes() == before
    r = qpm(["select", "--problem", "problem.npz", "--features", "4", "--per-class", "2", "--selector", "topk",
             "--bound", "lp", "--out", "sel.json"])
    assert r.returncode == 2 and "--bound applies to" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "sel.json").read_bytes() == before


def test_the_bound_is_a_declared_selector_option_on_every_path(qpm, tmp_path):
    import json

    from qpmcli.selection import select

    listed = {s["name"]: s for s in json.loads(qpm(["plugins", "--json"]).stdout)["selectors"]}
    bound = {o["name"]: o for o in listed["qpm"]["options"]}["bound"]
    assert bound["default"] == "auto" and bound["choices"] == ["lp", "sdp", "auto"]
    assert listed["topk"]["options"] == []
    prob = synthetic_problem(8, 4, seed=0, rank=3, n_samples=200)
    np.savez(tmp_path / "problem.npz", A=prob.A, R=prob.R)
    r = qpm(["select", "--problem", "problem.npz", "--features", "4", "--per-class", "2", "--workers", "2",
             "--selector-option", "bound=lp", "--out", "sel.json", "--json"])
    assert r.returncode == 0, r.stderr
    params = json.loads((tmp_path / "sel.json").read_text())["params"]
    assert params["bound_option"] == "lp" and params["selector_options"] == {"bound": "lp"}
    before = (tmp_path / "sel.json").read_bytes()
    for flags, message in ((["--selector-option", "bogus=1"], "selector 'qpm' has no option 'bogus'"),
                           (["--selector-option", "bound=best"], "option 'bound' must be one of lp, sdp, auto"),
                           (["--selector-option", "candidates=0"], "option 'candidates' must be a positive integer"),
                           (["--selector", "topk", "--selector-option", "bound=lp"],
                            "selector 'topk' has no option 'bound'")):
        r = qpm(["select", "--problem", "problem.npz", "--features", "4", "--per-class", "2", *flags,
                 "--out", "sel.json"])
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert (tmp_path / "sel.json").read_bytes() == before
    sel = select(prob, n_features=4, per_class=2, time_limit=20, workers=2, progress=False,
                 selector_options={"bound": "sdp"})
    assert sel.params["bound_option"] == "sdp" and sel.params["bound_method"] == "sdp"
    with pytest.raises(SelectionError, match="selector 'topk' has no option 'bound'; its options: none"):
        select(prob, selector="topk", n_features=4, per_class=2, selector_options={"bound": "lp"})


def test_explicit_sdp_bound_refuses_problems_too_big_for_its_memory():
    huge = Q.QpmInstance(coef=np.zeros((B.SDP_MAX_FEATURES + 1, 2)), pairs=np.zeros((0, 2), int), pair_w=np.zeros(0),
                         bonus=np.zeros(B.SDP_MAX_FEATURES + 1), K=4, k=2)
    with pytest.raises(SelectionError, match="--bound sdp: 2049 features"):
        B.bound_sources("sdp", huge, 8, 600.0)
    assert B.choose_bound("auto", huge, 600.0) == "lp"
