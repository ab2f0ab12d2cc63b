"""Built-in qpm selectors: ``qpm`` (CP-SAT + local search), ``gurobi`` (optional), ``topk``, ``sldd``, ``qsenn``.

Registered through the ``qpm`` entry-point group like any third-party selector. The factories import their modules
lazily so that ``qpm plugins`` stays fast (the ``qpm`` selector's declared options come from its light
``qpm.options`` module).
"""

from __future__ import annotations

from qpm_plugins.selectors.qpm.options import OPTIONS as QPM_OPTIONS

from qpmcli.contracts import SelectorSpec
from qpmcli.hookspecs import hookimpl


def _qpm(**options):
    from qpm_plugins.selectors.qpm.selector import QpmSelector

    return QpmSelector(**options)


def _gurobi():
    from qpm_plugins.selectors.gurobi import GurobiSelector

    return GurobiSelector()


def _topk():
    from qpm_plugins.selectors.topk import TopkSelector

    return TopkSelector()


def _sldd():
    from qpm_plugins.selectors.glm import SlddSelector

    return SlddSelector()


def _qsenn():
    from qpm_plugins.selectors.glm import QsennSelector

    return QsennSelector()


@hookimpl
def qpm_selectors() -> list:
    return [
        SelectorSpec("qpm", _qpm, "QPM: K binary features, k per class, distinct sets; OR-Tools CP-SAT + local search",
                     options=QPM_OPTIONS),
        SelectorSpec("gurobi", _gurobi, "QPM's MIP on Gurobi (optional extra qpm[gurobi]; needs gurobipy, proven "
                                        "optima within its licence's size)"),
        SelectorSpec("topk", _topk, "greedy baseline: forward-greedy features, each class its top-k (no search)"),
        SelectorSpec("sldd", _sldd, "SLDD: glm-saga group elastic-net selection, sparse real weights + bias"),
        SelectorSpec("qsenn", _qsenn, "Q-SENN: iterative SLDD with ternary weights, 4 iterations with a schedule"),
    ]
