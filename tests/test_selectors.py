"""The glm-saga selectors (sldd, qsenn): shapes, sparsity, discretisation, the Q-SENN schedule, plugin listing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qpm_plugins.selectors.glm import QsennSelector, qsenn_discretise, sldd_weights

from qpmcli.errors import SelectionError
from qpmcli.selection import select, synthetic_problem


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem(24, 6, seed=0, n_samples=240)


def test_sldd_returns_sparse_real_weights_with_bias(problem):
    sel = select(problem, selector="sldd", n_features=8, per_class=2, time_limit=2, progress=False)
    assert sel.weight.shape == (6, 8) and sel.bias.shape == (6,) and sel.trainable_norm
    assert len(np.unique(sel.features)) == 8 and np.all(np.diff(sel.features) > 0)
    assert 0 < np.count_nonzero(sel.weight) <= 6 * 2
    assert sel.params["selection_complete"] in (True, False) and sel.solver == "glm-saga"


def test_qsenn_weights_are_ternary_and_iterations_reuse_the_selection(problem):
    first = select(problem, selector="qsenn", n_features=8, per_class=2, time_limit=2, progress=False)
    vals = np.unique(np.abs(first.weight))
    assert len(vals[vals > 0]) <= 1  # {-m, 0, +m}
    assert first.params["iteration"] == 0 and first.bias.shape == (6,)
    second = select(problem, selector="qsenn", n_features=8, per_class=2, time_limit=2, previous=first,
                    progress=False)
    np.testing.assert_array_equal(second.features, first.features)
    assert second.params["iteration"] == 1


def test_qsenn_schedule_is_applied_per_iteration():
    q = QsennSelector()
    assert q.iterations == 4
    assert [q.finetune_schedule(i)["epochs"] for i in range(4)] == [10, 10, 10, 40]
    assert q.finetune_schedule(2)["lr_scale"] == pytest.approx(0.81)


def test_qsenn_discretise_thresholds_at_Ck_and_balances_bias():
    W = np.array([[0.9, -0.5, 0.05], [0.1, 0.8, -0.7], [0.0, 0.02, 0.6]])
    Wq, bias = qsenn_discretise(W, np.array([0.3, -0.1, 0.2]), per_class=1)  # keep C*k = 3 entries
    m = (0.9 + 0.8 + 0.7) / 3
    np.testing.assert_allclose(Wq, [[m, 0, 0], [0, m, -m], [0, 0, 0]])
    # n_pos - n_neg = [1, 0, 0] -> bias from +max|b| down to -max|b|
    np.testing.assert_allclose(bias, [-0.3, 0.3, 0.3])


def test_sldd_weights_pick_the_densest_entry_within_2k_and_keep_Ck():
    path = [{"weight": np.eye(3) * s, "bias": np.zeros(3), "index": i} for i, s in enumerate((0.0, 1.0))]
    dense = np.ones((3, 3))
    path.append({"weight": dense, "bias": np.ones(3), "index": 2})
    W, b, idx = sldd_weights(path, 3, per_class=1)
    # entry 0 is empty, entry 2 has 3 nonzeros per class > 2k = 2: entry 1 is the densest admissible one
    assert idx == 1 and np.count_nonzero(W) == 3
    path[1]["weight"] = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]])  # 2 per class, 6 > C*k
    W, _, idx = sldd_weights(path, 3, per_class=1)
    assert idx == 1 and np.count_nonzero(W) == 3 and np.all(np.diag(W) == 1.0)


def test_glm_selectors_need_dense_features():
    A = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(SelectionError, match="dense features"):
        select(A, selector="sldd", n_features=6, per_class=2, progress=False)


def test_plugins_lists_the_four_selectors(qpm):
    r = qpm(["plugins", "--json"])
    assert r.returncode == 0, r.stderr
    names = {s["name"] for s in json.loads(r.stdout)["selectors"]}
    assert {"qpm", "topk", "sldd", "qsenn"} <= names
