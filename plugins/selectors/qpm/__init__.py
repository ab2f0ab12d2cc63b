"""The ``qpm`` selector: QPM's feature selection and assignment (METHOD.md §6.5) on OR-Tools CP-SAT, license-free.

Problem: choose a set S of K features and for every class c a set F_c of exactly k features of S, no two classes with
the same set, maximising

    Z = 1000/(k C) * sum_c sum_{f in F_c} A[f, c]  -  sum_{disallowed f<g in S} Rt[f, g]  (+ sum_{f in S} B[f])

How we solve it (see ``solve``):
1. For a fixed S each class simply takes its top-k A-values in S (up to duplicate sets), so the search is over S only:
   greedy, clique and two seeded random starts, then best-improvement swap local search with perturbations (kicks
   of 4..16 random swaps, cycled; a budget counted in rounds, so deterministic), all vectorised in numpy.
   Duplicate class sets are repaired afterwards at minimal loss (``assign``; exact linear assignment when needed).
2. An honest upper bound: the LP relaxation (GLOP) of a *relaxed* model in which class c keeps only its top-M
   candidates plus an unconstrained "fallback" slot worth the (M+1)-th best value, with McCormick pair penalties,
   tightened by rounds of clique cuts on the penalty (``lp_bound``; exact least clique penalties, convexified).
   Every relaxation step only raises the optimum. On CUB-sized instances the gain part of this LP is within 0.2 %
   of the best selection; the gap that remains is the redundancy penalty (benchmarks/results/selection.md).
3. CP-SAT hinted with the incumbent: on small problems the exact model (its bound is valid and it proves optimality,
   duplicate sets forbidden lazily); on large ones the top-M restriction, which searches near the incumbent. Every
   solution it finds is mapped back to S and re-assigned exactly, so only truly feasible solutions are reported.
The reported gap is (bound - objective) / |objective| with the smallest valid bound.

Modules (none imports this package's ``__init__``, which only names the public API and loads a module when one of
its names is first used, so that reading the declared options at plugin discovery stays light):

- :mod:`.assignment`: the exact distinct-sets assignment for a fixed feature set;
- :mod:`.instance`: :class:`QpmInstance`, ``make_instance``, the objective, ``assign``, the top-M candidates, the gap;
- :mod:`.search`: greedy start, swap local search, iterated local search;
- :mod:`.lp`: the cut-LP bound (``LpBound``); :mod:`.sdp`: the SDP bound (``SdpBound``, SCS);
- :mod:`.cpsat`: the CP-SAT model in chunks (``CpsatModel``) and CP-SAT alone (``cpsat_solve``);
- :mod:`.bounds`: the bound sources of a request (``lp|sdp|auto``), timed or in their own thread;
- :mod:`.solver`: the deterministic anytime schedule (``solve``);
- :mod:`.options`: the selector's declared options; :mod:`.selector`: the plugin object (``QpmSelector``).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {  # module -> the public names it owns
    "assignment": ("exact_assignment",),
    "bounds": ("ConcurrentSource", "TimedSource", "bound_sources", "bound_stats", "choose_bound"),
    "cpsat": ("CpsatModel", "CpsatResult", "cpsat_solve", "exact_model_fits"),
    "instance": ("OPT_TOL", "QpmInstance", "assign", "candidates", "default_candidates", "gap_of", "make_instance"),
    "lp": ("LpBound", "clique_penalty_floor", "lp_bound", "packing_cuts"),
    "options": ("BOUND_CHOICES", "OPTIONS"),
    "sdp": ("SdpBound", "sdp_bound"),
    "search": ("IlsState", "greedy", "iterated_local_search", "local_search"),
    "selector": ("QpmSelector",),
    "solver": ("CPSAT_RESTRICT_MAX_ENTRIES", "ILS_GROWTH_CAP", "ILS_ROUNDS_EXACT", "ILS_ROUNDS_LARGE", "REF_ENTRIES",
               "START_ROUNDS_LARGE", "SolveResult", "size_scale", "solve"),
}
_OWNER = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_OWNER)


def __getattr__(name: str) -> Any:
    """``qpm.solve`` etc.: the owning module is imported on first use (PEP 562)."""
    module = _OWNER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_OWNER})
