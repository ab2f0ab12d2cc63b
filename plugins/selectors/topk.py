"""The ``topk`` selector: the greedy baseline (what the ``qpm`` selector starts from, without any search)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qpmcli.contracts import Selection, SelectionProblem


class TopkSelector:
    """Forward-greedy K features by top-k gain minus redundancy penalty; each class takes its top-k (deduplicated)."""

    name = "topk"
    iterations = 1

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        from qpm_plugins.selectors.qpm import assign, greedy, make_instance

        start = time.perf_counter()
        inst = make_instance(problem, n_features, per_class)
        S = greedy(inst)
        W = assign(inst, S)
        return Selection(features=S.astype(np.int64), weight=W.astype(np.float64), objective=inst.value(S, W),
                         status="HEURISTIC", seconds=time.perf_counter() - start, solver="greedy",
                         params={"n_features": n_features, "per_class": per_class, "threshold": inst.threshold})

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        return {}
