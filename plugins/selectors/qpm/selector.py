"""The ``qpm`` selector plugin object: a request's options, the instance, the bound sources and ``solve``."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from qpm_plugins.selectors.qpm.bounds import bound_sources, bound_stats
from qpm_plugins.selectors.qpm.instance import make_instance
from qpm_plugins.selectors.qpm.options import BOUND_CHOICES
from qpm_plugins.selectors.qpm.solver import solve

from qpmcli.contracts import Selection, SelectionProblem
from qpmcli.errors import SelectionError


class QpmSelector:
    """QPM: exactly ``per_class`` of ``n_features`` binary features per class, distinct class sets."""

    name = "qpm"
    iterations = 1

    def __init__(self, *, bound: str = "auto", candidates: int | None = None, deterministic: bool = True,
                 work_limit: int | None = None) -> None:
        """The declared options (:data:`~qpm_plugins.selectors.qpm.options.OPTIONS`), checked here, before any work."""
        if bound not in BOUND_CHOICES:
            raise SelectionError(f"selector 'qpm' option 'bound' must be one of {', '.join(BOUND_CHOICES)}, "
                                 f"got {bound!r}")
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int)
                                       or candidates < 1):
            raise SelectionError(f"selector 'qpm' option 'candidates' must be a positive integer, got {candidates!r}")
        if work_limit is not None and (isinstance(work_limit, bool) or not isinstance(work_limit, int)
                                       or work_limit < 1):
            raise SelectionError(f"selector 'qpm' option 'work_limit' must be a positive integer (cycles), got "
                                 f"{work_limit!r}")
        self.bound = bound  # lp | sdp | auto: the certified bound's source (bounds.choose_bound)
        self.candidates = candidates
        self.deterministic = bool(deterministic)
        self.work_limit = work_limit  # cycles instead of the clock (solve's work_limit): machine-independent

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        start = time.perf_counter()
        inst = make_instance(problem, n_features, per_class)
        prev = None if previous is None else np.asarray(previous.features)
        setup = time.perf_counter() - start  # the redundancy threshold: 1 s at 512 features, 15 s at 2048
        remaining = max(time_limit - setup, 0.5)
        # auto's choice reads the requested limit (">= 60 s"), not what the instance's setup left of it
        sources = bound_sources(self.bound, inst, self.candidates, time_limit,
                                work_limited=self.work_limit is not None)
        res = solve(inst, time_limit=remaining, seed=seed, workers=workers, previous=prev, M=self.candidates,
                    deterministic=self.deterministic, progress=progress, bound_sources=sources,
                    work_limit=self.work_limit)
        return Selection(
            features=res.S.astype(np.int64), weight=res.W.astype(np.float64), bias=None, trainable_norm=False,
            objective=res.objective, bound=res.bound, gap=res.gap, status=res.status,
            seconds=time.perf_counter() - start, solver="ortools-cpsat+local-search",
            params={"n_features": n_features, "per_class": per_class, "time_limit": time_limit, "seed": seed,
                    "workers": workers, "deterministic": self.deterministic, "work_limit": self.work_limit,
                    "setup_seconds": round(setup, 3),
                    **_jsonable(res.stats),
                    **bound_stats(self.bound, sources, res.stats, res.bound)},
        )

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        return {}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, val in d.items():
        if isinstance(val, float | np.floating):
            val = float(val)
            out[key] = val if math.isfinite(val) else None
        elif isinstance(val, np.integer):
            out[key] = int(val)
        else:
            out[key] = val
    return out
