"""Stage 2: the selection problem (A, R, redundancy threshold) and the selection it yields (METHOD.md §6).

``build_problem`` turns the dense model's pooled train features into a :class:`SelectionProblem`; ``select`` hands it
to a selector plugin (``qpm``, ``sldd``, ``qsenn``, ``topk``) and checks what comes back; ``save_selection`` /
``load_selection`` read and write the selection JSON (docs/design.md, "Interfaces between stages").

Deliberate differences from the reference (docs/method-notes.md, METHOD.md §6.9 / §12 item 12): R has its negatives
clipped at 0 (as in the original QPM) and the clique threshold, the disallowed-pair test and the penalty weights all use
that one R (the reference searches cliques on 2R but tests pairs on R). The threshold itself is the reference procedure
step for step (``clique_threshold``, :mod:`qpmcli.redundancy`); qpm's earlier bisection rule is the option
``threshold_rule="greedy-bisect"``.

numpy is imported at module level: the CLI imports this module only inside commands.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qpmcli.artifact import DENSE_FEATURES, RunFolder, atomic_write_text
from qpmcli.contracts import Selection, SelectionProblem
from qpmcli.errors import SelectionError

SELECTION_FORMAT = "qpm-selection/1"


# ------------------------------------------------------------------------------------------------------- A, R, B
def compute_A(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Feature-class Pearson correlation with the one-vs-rest class indicator, divided by max|A| (METHOD §6.1).

    Dead features (std 0) get a zero row (denominator clipped at 1e-10, as in DINO-QPM). Returns float64 [n_f, C].
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise SelectionError(f"features must be [N, n_f] with one label per row; got {X.shape} and {y.shape} labels")
    if y.size == 0 or y.min() < 0 or y.max() >= n_classes:
        raise SelectionError(f"labels must lie in 0..{n_classes - 1}")
    n = X.shape[0]
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), y] = 1.0
    Xc = X - X.mean(0)
    Yc = Y - Y.mean(0)
    cov = Xc.T @ Yc / n  # [n_f, C], population covariance
    denom = np.maximum(np.outer(X.std(0), Y.std(0)), 1e-10)
    A = cov / denom
    m = np.abs(A).max()
    return A / m if m > 0 else A


def compute_R(A: np.ndarray) -> np.ndarray:
    """Cosine similarity of A's rows, negatives clipped at 0, on the scale where the diagonal is 1 (METHOD §6.2).

    Zero rows (dead features) give zero rows/columns. Returns float64 [n_f, n_f], symmetric, values in [0, 1].
    """
    A = np.asarray(A, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-8)
    U = A / norms
    R = U @ U.T
    m = np.abs(R).max()
    if m > 0:
        R = R / m
    R = np.clip(R, 0.0, 1.0)
    return (R + R.T) / 2.0


# ------------------------------------------------------------------------------------------------- cliques (§6.4)
THRESHOLD_RULES = ("reference", "greedy-bisect")
_THRESHOLD_CACHE: dict[tuple, RedundancyThreshold] = {}
_THRESHOLD_CACHE_SIZE = 8


@dataclass
class RedundancyThreshold:
    """Result of the clique sweep: pairs with ``R >= threshold`` are penalised; ``clique`` holds ``clique_size >=
    target`` features that are pairwise below the threshold, in the order the solver is seeded from
    (``clique[:target]``).

    ``step`` is the sweep index whose graph gave the clique (-1: the fallback above every value of R), ``chosen``
    the index where the reference's walk started (``None`` for greedy-bisect), ``rule`` the procedure.
    """

    threshold: float
    clique: list[int]
    step: int
    target: int
    rule: str = "reference"
    clique_size: int = 0
    chosen: int | None = None
    fallback: bool = False

    def info(self) -> dict[str, Any]:
        """The facts the selection JSON records (``params``): rule, sweep step, tau and the start clique's size."""
        tau = float(self.threshold)
        return {"threshold_rule": self.rule, "threshold_step": int(self.step),
                "threshold": tau if math.isfinite(tau) else None, "start_clique_size": int(self.clique_size),
                "threshold_fallback": bool(self.fallback)}


def _greedy_clique(adj: np.ndarray, target: int, starts: np.ndarray) -> list[int]:
    """Largest clique found by a Pattabiraman-style greedy from the given start nodes (greedy-bisect rule only).

    From each start node of degree >= target-1, repeatedly add the candidate with the most neighbours among the
    remaining candidates; stop after the first clique of ``target`` nodes. Ties go to the lowest index. (The reference
    rule uses networkx's variant instead: :func:`qpmcli.redundancy.large_clique_size_es`.)
    """
    deg = adj.sum(1)
    best: list[int] = []
    for u in starts:
        if deg[u] < max(len(best), target - 1):
            continue
        clique = [int(u)]
        cand = adj[u].copy()
        while cand.any():
            idx = np.flatnonzero(cand)
            inner = adj[np.ix_(idx, idx)].sum(1)
            v = int(idx[int(np.argmax(inner))])
            clique.append(v)
            cand &= adj[v]
        if len(clique) > len(best):
            best = clique
        if len(best) >= target:
            break
    return best


def _greedy_bisect_threshold(R: np.ndarray, t: int, steps: int, n_starts: int) -> RedundancyThreshold:
    """qpm's earlier rule (a deliberate deviation, docs/method-notes.md): bisection over the reference's swept
    thresholds with :func:`_greedy_clique` started from the ``n_starts`` least redundant features; the result is the
    last swept threshold at which that greedy still finds ``t`` features. It is not the reference's answer: the
    reference stops at the first step whose networkx greedy estimate falls short and confirms with another
    heuristic, which usually gives a larger threshold (fewer penalised pairs)."""
    n = R.shape[0]
    C = R.copy()
    np.fill_diagonal(C, 0.0)
    v = np.sort(C, axis=None)
    e_star = n * n * (t - 2) / (t - 1)
    start = min(int(math.floor(e_star)), v.size - 1)
    n_zero = int((C == 0).sum())
    step = max((e_star - n_zero) / steps, 0.0)
    taus = [float(v[max(start - int(i * step), 0)]) for i in range(steps)]
    order = np.argsort(C.sum(1), kind="stable")[:n_starts]  # least redundant features first

    def clique_at(tau: float) -> list[int]:
        adj = C < tau
        np.fill_diagonal(adj, False)
        return _greedy_clique(adj, t, order)

    # Invariant: taus[lo] admits a clique (the largest threshold is checked first); find the last i that still does.
    first = clique_at(taus[0])
    if len(first) < t:
        # Even the densest swept graph has no t-clique: fall back to "no pair is disallowed below max R".
        tau_all = float(np.nextafter(C.max(), np.inf))
        found = clique_at(tau_all)
        return RedundancyThreshold(threshold=tau_all, clique=found[:t], step=-1, target=t, rule="greedy-bisect",
                                   clique_size=len(found), fallback=True)
    lo, hi, best = 0, steps, first
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cl = clique_at(taus[mid])
        if len(cl) >= t:
            lo, best = mid, cl
        else:
            hi = mid
    return RedundancyThreshold(threshold=taus[lo], clique=sorted(best[:t]), step=lo, target=t, rule="greedy-bisect",
                               clique_size=len(best))


def clique_threshold(R: np.ndarray, target: int, steps: int = 100, *, rule: str = "reference",
                     n_starts: int = 32, backend: str = "fast") -> RedundancyThreshold:
    """The redundancy threshold tau for ``target`` selected features on R (METHOD §6.4 with the §13 C16 details).

    ``rule="reference"`` (default) is the reference procedure step for step on our one-scale R
    (:func:`qpmcli.redundancy.reference_threshold`): the ordered sweep from the Turan edge target, the networkx
    greedy estimate early-stopped at the target, the stopping rule, then the walk toward denser graphs until the
    early-stopped Ramsey-removal clique reaches the target; ``backend`` picks the fast emulation or networkx itself
    (same answer, tested). ``rule="greedy-bisect"`` is qpm's earlier rule (:func:`_greedy_bisect_threshold`), kept
    as an option; it gives a different, usually smaller threshold.

    ``target < 2`` or more requested than available features: ``threshold = inf`` (nothing penalised). Results are
    cached per (R's bytes, target, steps, rule, n_starts) for the last few calls, since a benchmark or a solver
    restart asks for the same threshold again.
    """
    check_threshold_rule(rule)
    R = np.ascontiguousarray(R, dtype=np.float64)
    n = R.shape[0]
    t = int(target)
    if t < 2 or n < t:
        return RedundancyThreshold(threshold=math.inf, clique=list(range(min(n, t))), step=0, target=t, rule=rule,
                                   clique_size=min(n, t))
    import hashlib

    key = (hashlib.blake2b(R.tobytes(), digest_size=16).hexdigest(), R.shape, t, int(steps), rule,
           int(n_starts) if rule == "greedy-bisect" else None)
    hit = _THRESHOLD_CACHE.get(key)
    if hit is None:
        if rule == "greedy-bisect":
            hit = _greedy_bisect_threshold(R, t, int(steps), int(n_starts))
        else:
            from qpmcli.redundancy import reference_threshold

            ref = reference_threshold(R, t, int(steps), backend=backend)
            hit = RedundancyThreshold(threshold=ref.threshold, clique=ref.clique, step=ref.step, target=t,
                                      rule="reference", clique_size=len(ref.clique), chosen=ref.chosen,
                                      fallback=ref.fallback)
        while len(_THRESHOLD_CACHE) >= _THRESHOLD_CACHE_SIZE:
            _THRESHOLD_CACHE.pop(next(iter(_THRESHOLD_CACHE)))
        _THRESHOLD_CACHE[key] = hit
    return RedundancyThreshold(**{**hit.__dict__, "clique": list(hit.clique)})


def disallowed_pairs(R: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``f < g`` with ``R[f, g] >= threshold`` and their penalty weights (METHOD §6.4 step 6-7).

    Weights are R min-shifted by the smallest positive off-diagonal value and divided by the largest shifted value,
    so they lie in (0, 1] (the original QPM rule on the clipped R). Returns ``(pairs [P, 2] int64, weights [P])``.
    """
    R = np.asarray(R, dtype=np.float64)
    iu = np.triu_indices(R.shape[0], k=1)
    vals = R[iu]
    mask = vals >= threshold
    pairs = np.stack([iu[0][mask], iu[1][mask]], axis=1).astype(np.int64)
    pos = vals[vals > 0]
    if pairs.size == 0 or pos.size == 0:
        return pairs.reshape(-1, 2), np.zeros(len(pairs))
    lo = pos.min()
    span = max(vals.max() - lo, 1e-12)
    w = (vals[mask] - lo) / span
    w = np.maximum(w, 1e-6)  # strictly positive: every disallowed pair costs something
    return pairs, w


# --------------------------------------------------------------------------------------------------- problems
def check_threshold_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`THRESHOLD_RULES`, else :class:`SelectionError` naming the choices."""
    if rule not in THRESHOLD_RULES:
        raise SelectionError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")
    return rule


def build_problem(features: np.ndarray, labels: np.ndarray, n_classes: int,
                  class_names: list[str] | None = None, *, threshold_rule: str = "reference") -> SelectionProblem:
    """A :class:`SelectionProblem` from pooled dense train features ``[N, n_f]`` and labels ``[N]`` (§6.1-§6.2).

    ``threshold_rule`` (:data:`THRESHOLD_RULES`) is stored on the problem for the selectors that penalise pairs.
    """
    check_threshold_rule(threshold_rule)
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise SelectionError(f"features must be [N, n_f] with one label per row; got features {X.shape}, labels "
                             f"{y.shape}")
    if not np.isfinite(X).all():
        rows = int((~np.isfinite(X)).any(axis=1).sum())
        raise SelectionError(f"the features hold NaN or inf in {rows} of {X.shape[0]} row(s); retrain the dense model "
                             f"(qpm train --resume) or fix the file")
    if y.min() < 0 or y.max() >= n_classes:
        raise SelectionError(f"labels must lie in 0..{n_classes - 1}; found {int(y.min())}..{int(y.max())}")
    A = compute_A(X, y, n_classes)
    R = compute_R(A)
    if class_names is not None and len(class_names) != n_classes:
        raise SelectionError(f"{len(class_names)} class names for {n_classes} classes")
    return SelectionProblem(A=A, R=R, features=X.astype(np.float32), labels=y, class_names=class_names,
                            threshold_rule=threshold_rule)


def synthetic_problem(n_features: int = 512, n_classes: int = 200, *, n_samples: int | None = None, rank: int = 24,
                      seed: int = 0, with_features: bool = True) -> SelectionProblem:
    """A realistic, seedable selection problem for tests and benchmarks (no trained model needed).

    Classes are points in a low-rank latent space grouped in families (like bird genera); samples are noisy class
    points; features are ReLU units of random projections, some of them near-duplicates of others, some dead.
    A and R are then computed exactly as from a dense model.
    """
    rng = np.random.default_rng(seed)
    n = n_samples or max(30 * n_classes, 200)
    n_fam = max(2, n_classes // 8)
    fam = rng.normal(size=(n_fam, rank)) * 1.5
    protos = fam[rng.integers(0, n_fam, n_classes)] + rng.normal(size=(n_classes, rank))
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    Z = protos[y] + 0.9 * rng.normal(size=(n, rank))
    W = rng.normal(size=(rank, n_features)) / math.sqrt(rank)
    dup = rng.random(n_features) < 0.15  # redundant features: noisy copies of an earlier direction
    src = rng.integers(0, n_features, n_features)
    W[:, dup] = W[:, src[dup]] + 0.3 * rng.normal(size=(rank, int(dup.sum()))) / math.sqrt(rank)
    b = rng.normal(size=n_features) * 0.5 - 0.3
    X = np.maximum(Z @ W + b + 0.3 * rng.normal(size=(n, n_features)), 0.0)
    X[:, rng.random(n_features) < 0.01] = 0.0  # a few dead ReLU units
    prob = build_problem(X, y, n_classes)
    if not with_features:
        prob.features, prob.labels = None, None
    return prob


def load_problem_npz(path: str | Path, *, threshold_rule: str = "reference") -> SelectionProblem:
    """A problem file: ``A`` [n_f, C], ``R`` [n_f, n_f], optional ``B`` [n_f], ``class_names``.

    A file with ``features`` and ``labels`` instead (e.g. ``<run>/dense_features.npz``) is turned into a problem.
    """
    check_threshold_rule(threshold_rule)
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"problem file {path} not found; write one with numpy.savez(path, A=A, R=R)")
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load would otherwise try (and refuse) to unpickle it
        raise SelectionError(f"{path} is not a numpy .npz archive; write one with numpy.savez(path, A=A, R=R)")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            arrays = {k: data[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SelectionError(f"cannot read {path} as a numpy .npz archive (object arrays are refused): {exc}") from exc
    names = [str(s) for s in arrays["class_names"].tolist()] if "class_names" in arrays else None
    if {"A", "R"} <= keys:
        A, R = np.asarray(arrays["A"], np.float64), np.asarray(arrays["R"], np.float64)
        if A.ndim != 2 or R.shape != (A.shape[0], A.shape[0]):
            raise SelectionError(f"{path}: A must be [n_f, C] and R [n_f, n_f]; got A {A.shape}, R {R.shape}")
        if not (np.isfinite(A).all() and np.isfinite(R).all()):
            raise SelectionError(f"{path}: A and R must be finite (found NaN or inf)")
        B = np.asarray(arrays["B"], np.float64) if "B" in arrays else None
        if names is not None and len(names) != A.shape[1]:
            raise SelectionError(f"{path}: {len(names)} class_names for {A.shape[1]} classes (A is {A.shape})")
        return SelectionProblem(A=A, R=R, B=B, class_names=names, threshold_rule=threshold_rule)
    if {"features", "labels"} <= keys:
        labels = arrays["labels"].astype(np.int64)
        n_classes = len(names) if names else int(labels.max()) + 1
        return build_problem(arrays["features"], labels, n_classes, class_names=names, threshold_rule=threshold_rule)
    raise SelectionError(f"{path} holds {sorted(keys)}; expected A and R (or features and labels)")


def problem_from_run(run_dir: str | Path, *, threshold_rule: str = "reference") -> SelectionProblem:
    """The problem of a training run: ``<run>/dense_features.npz`` (pooled dense train features and labels).

    Class names (and so the number of classes, even when the last class has no sample) come from the npz or from
    the run's ``model.json`` / ``dense.json`` / ``config.json`` when one of them lists ``class_names``.
    """
    check_threshold_rule(threshold_rule)
    run = Path(run_dir)
    path = run / DENSE_FEATURES
    if not run.is_dir():
        raise SelectionError(f"run directory {run} not found")
    if not path.is_file():
        raise SelectionError(f"{path} not found; train the dense model first (qpm train) or pass --problem FILE")
    names = RunFolder(run).class_names()
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"features", "labels"} <= set(data.files):
                raise SelectionError(f"{path} must hold 'features' [N, n_f] and 'labels' [N]; has {data.files}")
            features, labels = data["features"], data["labels"].astype(np.int64)
            if "class_names" in data.files:
                names = [str(c) for c in data["class_names"].tolist()]
    except (OSError, ValueError) as exc:
        raise SelectionError(f"cannot read {path}: {exc}") from exc
    n_classes = len(names) if names else int(labels.max()) + 1
    return build_problem(features, labels, n_classes, class_names=names, threshold_rule=threshold_rule)


# -------------------------------------------------------------------------------------------------- selecting
@dataclass(frozen=True)
class SelectRequest:
    """A feature selection (``qpm select``, :func:`select`, the selection stage of ``qpm train``): the selector and
    its declared options (``selector_options``: e.g. the ``qpm`` selector's ``bound``, ``work_limit``; ``qpm
    plugins --json`` lists them), the sizes (K features, k per class), the time limit, seed and CP-SAT workers, and
    the redundancy threshold rule used to pose the problem."""

    selector: str = "qpm"
    n_features: int = 50
    per_class: int = 5
    time_limit: float = 60.0
    seed: int = 0
    workers: int = 8
    selector_options: dict[str, Any] = field(default_factory=dict)
    threshold_rule: str = "reference"

    def checked(self, n_classes: int | None = None, n_total: int | None = None) -> SelectRequest:
        """Every check that needs no solving (one line, exit 2 each): the selector's name and options (keys, choices
        and the selector's own value checks: :func:`make_selector`), the sizes (against the problem's class and
        feature counts when given), the time limit, workers, seed and threshold rule."""
        from qpmcli.checks import (
            check_choice,
            check_selection_sizes,
            check_solver_seed,
            check_time_limit,
            check_workers,
        )

        make_selector(self.selector, self.selector_options)
        check_selection_sizes(self.n_features, self.per_class, n_classes, n_total)
        check_time_limit(self.time_limit)
        check_workers(self.workers)
        check_solver_seed(self.seed)
        check_choice(self.threshold_rule, THRESHOLD_RULES, "--threshold-rule")
        return self

    def solver_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`select` (everything but the threshold rule, which poses the problem)."""
        return {"selector": self.selector, "n_features": self.n_features, "per_class": self.per_class,
                "time_limit": self.time_limit, "seed": self.seed, "workers": self.workers,
                "selector_options": dict(self.selector_options)}


def make_selector(selector: str, options: dict[str, Any] | None = None) -> Any:
    """The named selector built with its options (``factory(**options)``), checked before any work.

    A key that the selector does not declare (``SelectorSpec.options``, else its factory's keyword-only parameters:
    ``qpmcli.registry.declared_options``) or a value outside the option's choices is a :class:`SelectionError` naming
    the selector and its options; the selector checks its values further itself. The CLI
    parses ``--selector-option KEY=VALUE`` into typed values with ``qpmcli.options.parse_plugin_options`` first.
    """
    from qpmcli.registry import declared_options, get_registry

    spec = get_registry().get("selector", selector)
    options = dict(options or {})
    by_name = declared_options("selector", spec)
    if by_name is not None:
        for key, value in options.items():
            opt = by_name.get(key)
            if opt is None:
                raise SelectionError(f"selector {selector!r} has no option {key!r}; its options: "
                                     f"{', '.join(by_name) or 'none'}")
            if opt.choices and value not in opt.choices:
                raise SelectionError(f"selector {selector!r} option {key!r} must be one of "
                                     f"{', '.join(map(str, opt.choices))}, got {value!r}")
    return spec.factory(**options)


def select(A_or_problem: Any, R: Any = None, *, selector: str = "qpm", n_features: int = 50, per_class: int = 5,
           time_limit: float = 60.0, seed: int = 0, workers: int = 8, previous: Selection | None = None,
           progress: bool = True, selector_options: dict[str, Any] | None = None) -> Selection:
    """Select ``n_features`` features and assign ``per_class`` of them to every class with the named selector.

    ``selector_options`` are the selector's declared options (:func:`make_selector`; ``qpm plugins --json`` lists
    them), e.g. ``{"bound": "sdp"}`` for the ``qpm`` selector's certified bound (``qpm select --bound``).

    ``A_or_problem`` is a :class:`SelectionProblem` or the matrix A (then ``R`` is required). The result is checked
    (binary selectors: exactly ``per_class`` per class, distinct class sets) before it is returned.
    """
    if isinstance(A_or_problem, SelectionProblem):
        problem = A_or_problem
    else:
        A = np.asarray(A_or_problem, dtype=np.float64)
        if R is None:
            R = compute_R(A)
        problem = SelectionProblem(A=A, R=np.asarray(R, dtype=np.float64))
    if problem.A.ndim != 2 or problem.R.shape != (problem.A.shape[0],) * 2:
        raise SelectionError(f"A must be [n_f, C] and R [n_f, n_f]; got {problem.A.shape} and {problem.R.shape}")
    req = SelectRequest(selector=selector, n_features=n_features, per_class=per_class, time_limit=time_limit,
                        seed=seed, workers=workers, selector_options=dict(selector_options or {}),
                        threshold_rule=problem.threshold_rule)
    req.checked(problem.n_classes, problem.n_features_total)
    sel_obj = make_selector(selector, req.selector_options)
    start = time.perf_counter()
    try:
        sel = sel_obj.select(problem, n_features=n_features, per_class=per_class, time_limit=time_limit, seed=seed,
                             workers=workers, previous=previous, progress=progress)
    except Exception as exc:
        if not type(exc).__module__.startswith("gurobipy"):
            raise
        # Gurobi's own errors describe the machine (licence file, licence limits, token server), not a bug
        raise SelectionError(f"selector {selector!r}: Gurobi refused to run ({exc}); check the licence "
                             f"(GRB_LICENSE_FILE, `gurobi_cl --license`) or use --selector qpm") from None
    if not sel.seconds:
        sel.seconds = time.perf_counter() - start
    sel.params.setdefault("selector", selector)
    sel.params.setdefault("selector_options", dict(selector_options or {}))
    validate_selection(sel, problem.n_classes, n_features, per_class, binary=not sel.trainable_norm)
    return sel


def validate_selection(sel: Selection, n_classes: int, n_features: int, per_class: int, *,
                       binary: bool = True) -> None:
    """Raise :class:`SelectionError` unless ``sel`` satisfies every constraint of the request.

    Always: sorted distinct indices, weight [C, K]. Binary (QPM) selections additionally: 0/1 weights, exactly
    ``per_class`` per class, and no two classes with the same feature set.
    """
    feats = np.asarray(sel.features)
    W = np.asarray(sel.weight)
    if feats.ndim != 1 or len(feats) != n_features:
        raise SelectionError(f"selection has {feats.size} features, expected {n_features}")
    if len(np.unique(feats)) != len(feats) or np.any(np.diff(feats) <= 0):
        raise SelectionError("selected feature indices must be sorted and distinct")
    if W.shape != (n_classes, n_features):
        raise SelectionError(f"weight has shape {W.shape}, expected ({n_classes}, {n_features})")
    if not binary:
        return
    if not np.isin(W, (0, 1)).all():
        raise SelectionError("a QPM weight must be binary")
    counts = W.sum(1)
    if np.any(counts != per_class):
        bad = int(np.flatnonzero(counts != per_class)[0])
        raise SelectionError(f"class {bad} has {int(counts[bad])} features, expected {per_class}")
    rows = {tuple(np.flatnonzero(r)) for r in W}
    if len(rows) != n_classes:
        raise SelectionError("two classes share the same feature set")


def save_selection(sel: Selection, path: str | Path, class_names: list[str] | None = None) -> Path:
    """Write the selection JSON (format :data:`SELECTION_FORMAT`) atomically; returns the path."""
    path = Path(path)
    data = {
        "format": SELECTION_FORMAT,
        "features": [int(f) for f in np.asarray(sel.features)],
        "weight": np.asarray(sel.weight, dtype=np.float64).tolist(),
        "bias": None if sel.bias is None else np.asarray(sel.bias, dtype=np.float64).tolist(),
        "trainable_norm": bool(sel.trainable_norm),
        "objective": sel.objective,
        "bound": sel.bound,
        "gap": sel.gap,
        "status": sel.status,
        "seconds": sel.seconds,
        "solver": sel.solver,
        "params": sel.params,
    }
    if class_names is not None:
        data["class_names"] = list(class_names)
    return atomic_write_text(path, json.dumps(data, indent=1, default=_json_default))


def load_selection(path: str | Path) -> Selection:
    """Read a selection JSON written by :func:`save_selection`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        _check_selection_format(data, path)
        return Selection(
            features=np.asarray(data["features"], dtype=np.int64),
            weight=np.asarray(data["weight"], dtype=np.float64),
            bias=None if data.get("bias") is None else np.asarray(data["bias"], dtype=np.float64),
            trainable_norm=bool(data.get("trainable_norm", False)),
            objective=data.get("objective"), bound=data.get("bound"), gap=data.get("gap"),
            status=data.get("status", "UNKNOWN"), seconds=float(data.get("seconds", 0.0)),
            solver=data.get("solver", ""), params=data.get("params", {}),
        )
    except FileNotFoundError as exc:
        raise SelectionError(f"selection file {path} not found") from exc
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise SelectionError(f"{path} is not a qpm selection JSON: {str(exc) or type(exc).__name__}") from exc


def _check_selection_format(data: Any, path: Path) -> None:
    """``format`` is ``qpm-selection/<version>``; a newer version than :data:`SELECTION_FORMAT`'s is refused."""
    if not isinstance(data, dict):
        raise SelectionError(f"{path} is not a qpm selection JSON (a JSON {type(data).__name__})")
    fmt = data.get("format", SELECTION_FORMAT)
    name, _, version = str(fmt).partition("/")
    supported = int(SELECTION_FORMAT.rpartition("/")[2])
    if name != SELECTION_FORMAT.partition("/")[0] or not version.isdigit():
        raise SelectionError(f"{path} is not a qpm selection JSON (format {fmt!r})")
    if int(version) > supported:
        from qpmcli.version import qpm_version

        raise SelectionError(f"{path} has format version {int(version)}, but this qpm ({qpm_version()}) reads format "
                             f"version {supported} and older; upgrade qpm (pip install -U qpm) to read it")


def selection_summary(sel: Selection) -> dict[str, Any]:
    """The JSON-able facts of a selection without the weight matrix (for `qpm select --json` and logs)."""
    return {"features": [int(f) for f in sel.features], "objective": sel.objective, "bound": sel.bound,
            "gap": sel.gap, "status": sel.status, "seconds": round(float(sel.seconds), 3), "solver": sel.solver,
            "params": sel.params}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
