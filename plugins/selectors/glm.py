"""The ``sldd`` and ``qsenn`` selectors: sparse GLM heads fitted with glm-saga (METHOD.md §7.1, §7.2, §13 C4/C5).

Both need the pooled dense train features (``problem.features``/``labels``), standardised with the train mean/std
(sigma clamped at 1e-5). Both return real (SLDD) or ternary (Q-SENN) weights with a bias and ``trainable_norm=True``.

Deviations from the reference, on purpose:
- Group selection: we walk one group-elastic-net path (alpha 0.8, 100 log-spaced lambdas from lambda_max to
  1e-3 lambda_max, x0.1 as in the reference) with glm-saga's proximal SAGA and take features in the order their
  weight columns become nonzero, instead of the reference's masked one-feature-at-a-time proximal step that restarts
  the sweep at lambda_max for every feature (C4; ~50 restarts of up to 2000 epochs each). lambda_max is computed on
  the standardised features the fit actually uses (the reference uses raw features, a quirk).
- SAGA runs at most 100 epochs per lambda (reference: 2000) with the same stopping rule (tol 1e-4, lookbehind);
  warm starts along the path make later lambdas cheap, and 2000 would cost hours on CPU.
- Every path fit respects ``time_limit``: if it runs out, the last converged entry is used (reported in params).
- Q-SENN's discretisation follows C5 without the sign-flip quirk, and a constant bias replaces the reference's
  division by zero when all classes have the same n_pos - n_neg.
- ``finetune_schedule`` gives Q-SENN's intended schedule (10, 10, 10, 40 epochs, lr x 0.9^iteration), which the
  reference forgot to apply (§7.2, §12 item 4).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from qpmcli.contracts import Selection, SelectionProblem
from qpmcli.errors import SelectionError

SELECT_ALPHA = 0.8
FIT_ALPHA = 0.99
N_LAMBDAS = 100
LAM_FACTOR = 0.1  # the reference multiplies every path lambda by 0.1 (lam_fac)
LR = 0.1
MAX_EPOCHS = 100  # per lambda; the reference allows 2000 (see module docstring)
TOL = 1e-4


def _standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(features, dtype=np.float32)
    mu = X.mean(0)
    sigma = np.maximum(X.std(0), 1e-5)
    return (X - mu) / sigma, mu, sigma


def _need_features(problem: SelectionProblem, name: str) -> tuple[np.ndarray, np.ndarray]:
    if problem.features is None or problem.labels is None:
        raise SelectionError(f"the {name} selector fits a GLM on the dense features: select from a run directory "
                             f"(dense_features.npz) or a problem file with 'features' and 'labels', not A/R only")
    return np.asarray(problem.features), np.asarray(problem.labels).astype(np.int64)


def _path(X: np.ndarray, y: np.ndarray, n_classes: int, *, alpha: float, group: bool, deadline: float, seed: int,
          stop=None, lam_factor: float = 1.0, epsilon: float = 1e-3, max_epochs: int = MAX_EPOCHS,
          lookbehind: int = 3) -> list[dict[str, Any]]:
    """Elastic-net GLM path with glm-saga's proximal SAGA, warm-started from lambda to lambda.

    ``stop(entry) -> bool`` ends the path early; the wall-clock ``deadline`` ends it too (last entry kept).
    """
    import torch
    from glm_saga.elasticnet import maximum_reg

    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(y)
    loader = _Batches(Xt, yt, 256, seed)
    linear = torch.nn.Linear(X.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    lam_max = maximum_reg(Xt, yt, group=group) / max(alpha, 1e-3)
    lams = np.logspace(math.log10(lam_max), math.log10(lam_max * epsilon), N_LAMBDAS) * lam_factor
    state = None
    path: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and fight other processes)
    try:
        _run_path(path, lams, linear, loader, alpha, group, state, len(y), n_classes, max_epochs, lookbehind,
                  deadline, stop)
    finally:
        torch.set_num_threads(threads)
    return path


class _Batches:
    """Shuffled (X, y, index) batches, reshuffled every epoch from a seeded generator (what glm-saga iterates).

    A torch DataLoader fetches item by item; on these small in-memory matrices that dominated the fit time.
    """

    def __init__(self, X, y, batch_size: int, seed: int) -> None:
        import torch

        self.X, self.y, self.bs = X, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        import torch

        perm = torch.randperm(len(self.y), generator=self.gen)
        for i in range(0, len(perm), self.bs):
            idx = perm[i : i + self.bs]
            yield self.X[idx], self.y[idx], idx


def _run_path(path, lams, linear, loader, alpha, group, state, n_ex, n_classes, max_epochs, lookbehind, deadline,
              stop) -> None:
    import warnings

    from glm_saga.elasticnet import train_saga

    for i, lam in enumerate(lams):
        if time.perf_counter() > deadline and path:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # glm-saga's implicit softmax dim
            state = train_saga(linear, loader, LR, max_epochs, float(lam), alpha, group=group, state=state,
                               n_ex=n_ex, n_classes=n_classes, tol=TOL, lookbehind=lookbehind,
                               logger=lambda *_: None)
        entry = {"index": i, "lam": float(lam), "weight": linear.weight.detach().numpy().copy(),
                 "bias": linear.bias.detach().numpy().copy()}
        path.append(entry)
        if stop is not None and stop(entry):
            break


def group_selection(X: np.ndarray, y: np.ndarray, n_classes: int, n_features: int, *, deadline: float,
                    seed: int, A: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Features in the order they enter the group elastic-net path (alpha 0.8), until ``n_features`` are in."""
    order: list[int] = []
    # constant (dead) features carry nothing, and glm-saga's group prox divides 0 by 0 on their columns (NaN)
    live = np.flatnonzero(X.std(0) > 1e-6)

    def stop(entry: dict[str, Any]) -> bool:
        norms = np.linalg.norm(entry["weight"], axis=0)
        new = [int(live[f]) for f in np.argsort(-norms, kind="stable")
               if norms[f] > 1e-8 and int(live[f]) not in order]
        order.extend(new)
        return len(order) >= n_features

    path = _path(X[:, live], y, n_classes, alpha=SELECT_ALPHA, group=True, deadline=deadline, seed=seed, stop=stop,
                 lam_factor=LAM_FACTOR, max_epochs=MAX_EPOCHS)
    info = {"selection_path_steps": len(path), "selection_complete": len(order) >= n_features}
    if len(order) < n_features:  # time ran out: fill up by the last path entry's norms, then by max |A|
        last = np.zeros(X.shape[1])
        last[live] = np.linalg.norm(np.nan_to_num(path[-1]["weight"]), axis=0)
        corr = np.abs(A).max(1) if A is not None else np.zeros_like(last)
        for f in np.lexsort((-corr, -last)):
            if int(f) not in order:
                order.append(int(f))
            if len(order) >= n_features:
                break
    return np.sort(np.array(order[:n_features], dtype=np.int64)), info


def fit_path(Xs: np.ndarray, y: np.ndarray, n_classes: int, *, deadline: float, seed: int,
             per_class: int) -> list[dict[str, Any]]:
    """glm-saga path (alpha 0.99) on the selected standardised features (METHOD §7.1 step 3)."""

    def stop(entry: dict[str, Any]) -> bool:
        nnz = (np.abs(entry["weight"]) > 1e-5).sum() / n_classes
        return nnz > 2 * per_class * 2  # far past the density any selector reads; the rest of the path is unused

    return _path(Xs, y, n_classes, alpha=FIT_ALPHA, group=False, deadline=deadline, seed=seed, stop=stop,
                 lookbehind=5)


def sldd_weights(path: list[dict[str, Any]], n_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The densest path entry with mean nonzeros per class <= 2k, keeping its C*k largest |w| (§7.1 step 4, C4)."""
    nnz = [float((np.abs(e["weight"]) > 1e-5).sum()) / n_classes for e in path]
    ok = [i for i, v in enumerate(nnz) if v <= 2 * per_class and v > 0]
    idx = max(ok, key=lambda i: (nnz[i], -i)) if ok else len(path) - 1
    W = path[idx]["weight"].copy()
    keep = n_classes * per_class
    flat = np.abs(W).ravel()
    if (flat > 0).sum() > keep:
        cut = np.argsort(-flat, kind="stable")[keep:]
        W.ravel()[cut] = 0.0
    return W, path[idx]["bias"].copy(), idx


def qsenn_discretise(W: np.ndarray, b: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Ternary weights {-m, 0, +m} and the Q-SENN bias (METHOD §7.2 (d)-(e), C5 without the sign-flip quirk)."""
    C = W.shape[0]
    a = np.abs(W).ravel()
    keep = C * per_class
    nz = np.sort(a[a > 0])[::-1]
    if len(nz) == 0:
        return np.zeros_like(W), np.zeros_like(b)
    thr = (nz[keep - 1] + nz[keep]) / 2 if len(nz) > keep else nz[-1] - 1e-12
    big = np.abs(W) > thr
    if not big.any():
        return np.zeros_like(W), np.zeros_like(b)
    m = float(np.abs(W)[big].mean())
    Wq = np.where(big, np.sign(W) * m, 0.0)
    diff = (Wq > 0).sum(1) - (Wq < 0).sum(1)
    bmax = float(np.abs(b).max())
    steps = int(diff.max() - diff.min())
    if steps == 0 or bmax == 0:
        bias = np.zeros(C)
    else:
        bias = bmax - (diff - diff.min()) * (2 * bmax / steps)
        bias = np.clip(bias, -bmax, bmax)
    return Wq, bias


class SlddSelector:
    """SLDD ("Take 5"): group elastic-net selection of K features, then a sparse real-valued GLM on them."""

    name = "sldd"
    iterations = 1

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        import torch

        start = time.perf_counter()
        torch.manual_seed(seed)
        feats, y = _need_features(problem, self.name)
        C = problem.n_classes
        Xs, _, _ = _standardise(feats)
        sel, info = group_selection(Xs, y, C, n_features, deadline=start + 0.6 * time_limit, seed=seed,
                                    A=problem.A)
        path = fit_path(Xs[:, sel], y, C, deadline=start + time_limit, seed=seed, per_class=per_class)
        W, b, idx = sldd_weights(path, C, per_class)
        return Selection(features=sel, weight=W.astype(np.float64), bias=b.astype(np.float64), trainable_norm=True,
                         status="HEURISTIC", seconds=time.perf_counter() - start, solver="glm-saga",
                         params={"n_features": n_features, "per_class": per_class, "seed": seed, "path_index": idx,
                                 "path_steps": len(path), **info})

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        return {}


class QsennSelector:
    """Q-SENN: SLDD-style selection in iteration 0, then per iteration a GLM path on the current features and
    ternary discretisation; the trainer finetunes between iterations with :meth:`finetune_schedule`."""

    name = "qsenn"
    iterations = 4
    EPOCHS = (10, 10, 10, 40)

    def select(self, problem: SelectionProblem, *, n_features: int = 50, per_class: int = 5,
               time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
               progress: bool = True) -> Selection:
        import torch

        start = time.perf_counter()
        torch.manual_seed(seed)
        feats, y = _need_features(problem, self.name)
        C = problem.n_classes
        Xs, _, _ = _standardise(feats)
        info: dict[str, Any] = {}
        if previous is not None and len(previous.features) == n_features:
            sel = np.sort(np.asarray(previous.features, dtype=np.int64))
            iteration = int(previous.params.get("iteration", 0)) + 1
        else:
            sel, info = group_selection(Xs, y, C, n_features, deadline=start + 0.6 * time_limit, seed=seed,
                                        A=problem.A)
            iteration = 0
        path = fit_path(Xs[:, sel], y, C, deadline=start + time_limit, seed=seed, per_class=per_class)
        entry = path[-1] if len(path) < N_LAMBDAS else path[N_LAMBDAS - 1]
        Wq, bias = qsenn_discretise(entry["weight"], entry["bias"], per_class)
        return Selection(features=sel, weight=Wq, bias=bias, trainable_norm=True, status="HEURISTIC",
                         seconds=time.perf_counter() - start, solver="glm-saga",
                         params={"n_features": n_features, "per_class": per_class, "seed": seed,
                                 "iteration": iteration, "path_index": entry["index"], **info})

    def finetune_schedule(self, iteration: int) -> dict[str, Any]:
        i = min(max(iteration, 0), len(self.EPOCHS) - 1)
        return {"epochs": self.EPOCHS[i], "lr_scale": 0.9**iteration}
