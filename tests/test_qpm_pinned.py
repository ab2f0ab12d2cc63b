"""Work-limited results of the ``qpm`` selector, pinned.

The values were recorded from the single-module solver (``plugins/selectors/qpm.py`` at commit 967bb26) before it
became the ``qpm_plugins.selectors.qpm`` package: a work limit (cycles instead of a clock) makes ``solve`` one exact
sequence of steps, so the package must give the same selection, value and bound. A later change that moves any of
these on purpose must say so in its commit and re-pin them.
"""

from __future__ import annotations

import math

import pytest
from qpm_plugins.selectors import qpm as Q

from qpmcli.selection import synthetic_problem

PINNED = [
    # (instance n, C, K, k, seed), solve options, selected features, objective, bound, ILS rounds, cycles
    pytest.param((12, 8, 6, 2, 3), dict(work_limit=1, seed=0, workers=2),
                 [0, 3, 6, 7, 9, 11], 532.8845455569457, 589.6781675, 8, 1, id="exact-model-cpsat"),
    pytest.param((24, 12, 8, 2, 3), dict(work_limit=2, seed=0, workers=1, use_cpsat=False),
                 [3, 4, 6, 17, 18, 19, 20, 22], 451.8293767905649, 475.57408567375666, 24, 2, id="exact-model-search"),
    pytest.param((48, 20, 10, 2, 5), dict(work_limit=1, seed=4, workers=1, use_cpsat=False, exact_model=False,
                                          ils_rounds=8, start_rounds=4),
                 [2, 5, 8, 12, 18, 27, 29, 31, 38, 47], 371.7740890378698, 392.6583326433118, 8, 1,
                 id="large-schedule-search"),
    pytest.param((48, 20, 10, 2, 5), dict(work_limit=1, seed=6, workers=1, exact_model=False, ils_rounds=2,
                                          start_rounds=1),
                 [2, 5, 8, 12, 18, 27, 29, 31, 38, 47], 371.7740890378698, 392.6583326433118, 2, 1,
                 id="large-schedule-restricted-cpsat"),
]


@pytest.mark.parametrize(("shape", "options", "features", "objective", "bound", "rounds", "cycles"), PINNED)
def test_work_limited_solve_gives_the_pinned_selection(shape, options, features, objective, bound, rounds, cycles):
    n, C, K, k, seed = shape
    inst = Q.make_instance(synthetic_problem(n, C, seed=seed, n_samples=30 * C), K, k)
    res = Q.solve(inst, time_limit=math.inf, progress=False, **options)
    assert res.S.tolist() == features
    assert res.objective == pytest.approx(objective, rel=1e-12)
    assert res.bound == pytest.approx(bound, rel=1e-9)
    assert (res.stats["ils_rounds"], res.stats["cycles"]) == (rounds, cycles)
