"""Prediction sets with a guarantee: the method of split conformal prediction (``qpm conformal``).

A QPM model explains one class with its 5 features. When classes are close, a *set* says how uncertain the answer is
and why: "one of these 3 classes; they share features 12, 40 and 7 and part at 33, 18 and 5". Split conformal
prediction makes the set contain the true class with probability at least 1 - alpha:

- a *score* ``s(x, c)`` (large = class c fits image x badly) is computed on n calibration images for their true
  class; the threshold ``q`` is the exact ``ceil((n + 1)(1 - alpha))``-th smallest of those n scores (no
  interpolation; with fewer than ``ceil((1 - alpha) / alpha)`` images it does not exist and the set is every class);
- the set of an image is ``{c : s(x, c) <= q}``. When calibration and test images are exchangeable the set covers
  the true class with probability ``ceil((n + 1)(1 - alpha)) / (n + 1)`` for continuous scores (at least that with
  ties): ``tests/test_conformal.py`` checks the mean and the Beta-Binomial law of the test coverage.

Scores (:func:`class_scores`, on logits ``[N, C]`` and, for ``hier``, the standardized feature values ``[N, K]``):

- ``lac``: ``1 - p_c``, for the top class computed as the sum of the other probabilities so confident images keep
  their resolution;
- ``aps``: the probability mass of the classes ranked at or above c (deterministic: no random tie-break);
- ``hier``: on the model's own features. Each class's features are ranked by their contribution ``W[c, k] * z_k`` on
  the image (``z`` the standardized value the head multiplies; for a binary W the value itself); the *node* at level
  L holds the classes whose first L ranked features are the predicted class's first L. ``s_L(x, c) = g(m_c) +
  2 * [c outside the node]`` with ``m_c = max_{c' != c} logit_c' - logit_c`` (for c other than the predicted class:
  how far its logit trails it, which for a binary W is the summed difference of the values of the features where the
  two classes differ; shared features cancel) and ``g(m) = m / (1 + |m|)`` in (-1, 1). Every node member scores
  below every outsider, so a threshold below 1 keeps the set inside the node. L is chosen on one half of the
  calibration images (smallest mean set size) and the threshold on the other half, so the guarantee is exact at n =
  the second half's size (docs/method-notes.md: CHiQPM chooses both on the same images).
- ``per_class`` (Mondrian): one threshold per class from that class's calibration images; coverage then holds for
  every class.

The guarantee needs calibration images the model was not fitted on: ``qpm train --cal-fraction`` holds a split out
of training (:func:`held_out_split`, recorded in ``config.json``); the job (:func:`qpmcli.calibrate.run_conformal`,
on the run's cached outputs) uses it, and otherwise carves one from the training images (:func:`calibration_split`)
and records that the guarantee does not hold for it.

:func:`prediction_set` is the one function that turns a calibration entry and one image's model outputs into its
set (with, for a sparse head, the shared features and where each member diverges); predict and explain call it, and
:func:`evaluate_sets` applies the same membership rule to a whole split (calibration, ``qpm evaluate``). The document
format (``conformal.json``, ``qpm.conformal`` in ONNX metadata) and its checks belong to :mod:`qpmcli.modelfile`. This
module works on arrays (no run files, no model) and imports neither torch nor matplotlib.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from qpmcli.calibfile import CONFORMAL_FORMAT, CONFORMAL_FORMAT_VERSION, CONFORMAL_SCORES, model_fingerprint
from qpmcli.errors import ArtifactError, ConfigError, DatasetError
from qpmcli.modelfile import ClassifierMetadata

SCORES = CONFORMAL_SCORES
OUTSIDE = 2.0  # added to a hier score outside the node: every node member scores below every outsider
TREE_MAX_FEATURES = 10  # heads with more features per class (dense heads) get no feature tree
_CHUNK = 2048  # images per block when ranking features ([block, C, k] arrays)


# ------------------------------------------------------------------------------------------- the exact threshold
@functools.lru_cache(maxsize=256)
def _fraction(alpha: float) -> Fraction:
    """``alpha`` as the decimal it prints as (0.1 is 1/10), so ``(n + 1)(1 - alpha)`` is computed exactly."""
    return Fraction(repr(float(alpha)))


@functools.lru_cache(maxsize=4096)
def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``, exactly (rational arithmetic): the rank of the threshold among n scores."""
    return math.ceil((int(n) + 1) * (1 - _fraction(alpha)))


def minimum_calibration(alpha: float) -> int:
    """The fewest calibration scores for which the threshold exists: ``ceil((1 - alpha) / alpha)``."""
    a = _fraction(alpha)
    return math.ceil((1 - a) / a)


def exact_threshold(scores: Any, alpha: float) -> float | None:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``scores`` (no interpolation); ``None`` when that rank exceeds
    n (too few scores: the set is every class)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    k = conformal_rank(s.size, alpha)
    if k > s.size:
        return None
    return float(np.partition(s, k - 1)[k - 1])


def coverage_of(alpha: float) -> float:
    """``1 - alpha`` as the decimal it is (1 - 0.1 is 0.9)."""
    return float(1 - _fraction(alpha))


# ------------------------------------------------------------------------------------------------------ scores
def probabilities(logits: Any) -> np.ndarray:
    """Softmax in float64 over the last axis."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_features(weight: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(columns [C, m], counts [C])``: each class's feature columns (nonzero weights, ascending; -1 pads classes
    with fewer than ``m``, the most any class has)."""
    nz = np.asarray(weight) != 0
    counts = nz.sum(axis=1).astype(np.int64)
    m = int(counts.max()) if counts.size else 0
    cols = np.full((nz.shape[0], m), -1, dtype=np.int64)
    for c in range(nz.shape[0]):
        idx = np.flatnonzero(nz[c])
        cols[c, : idx.size] = idx
    return cols, counts


def _ranked(values: np.ndarray, wc: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rankings of rows of ``cols`` ([P, m] feature columns, -1 padded; ``wc`` their weights) on ``values`` [P, K]."""
    contrib = wc * np.take_along_axis(values, np.clip(cols, 0, None), axis=1)
    contrib[cols < 0] = -np.inf
    return np.take_along_axis(cols, np.argsort(-contrib, axis=1, kind="stable"), axis=1)


def _columns(weight: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(columns [C, m], their weights [C, m])`` (see :func:`class_features`)."""
    w = np.asarray(weight, dtype=np.float64)
    cols, _ = class_features(w)
    return cols, np.where(cols >= 0, w[np.arange(w.shape[0])[:, None], np.clip(cols, 0, None)], 0.0)


def feature_rankings(values: Any, weight: Any, classes: Any = None) -> np.ndarray:
    """Each class's feature columns ranked by their contribution ``W[c, k] * z_k`` on each image (largest first;
    ties keep the lower column first; -1 pads classes with fewer than m features): ``[N, C, m]``, or ``[N, m]`` for
    one class per image with ``classes [N]``."""
    z = np.atleast_2d(np.asarray(values, dtype=np.float64))
    cols, wc = _columns(weight)
    if classes is not None:
        c = np.asarray(classes, dtype=np.int64)
        return _ranked(z, wc[c], cols[c])
    out = np.empty((z.shape[0], *cols.shape), dtype=np.int64)
    for c in range(cols.shape[0]):
        out[:, c] = _ranked(z, np.broadcast_to(wc[c], (z.shape[0], cols.shape[1])),
                            np.broadcast_to(cols[c], (z.shape[0], cols.shape[1])))
    return out


def shared_prefix(values: Any, weight: Any, reference: Any) -> np.ndarray:
    """``[N, C]``: how many leading features of each class's ranking (:func:`feature_rankings`) equal those of class
    ``reference[n]``'s ranking on image n. Only classes that hold the reference's first feature can share anything,
    so only those are ranked (about ``C * k / K`` of them)."""
    z = np.atleast_2d(np.asarray(values, dtype=np.float64))
    ref = np.asarray(reference, dtype=np.int64)
    cols, wc = _columns(weight)
    n, m = z.shape[0], cols.shape[1]
    ref_rank = _ranked(z, wc[ref], cols[ref])  # [N, m]
    out = np.zeros((n, cols.shape[0]), dtype=np.int64)
    if m == 0:
        return out + m
    first = ref_rank[:, 0]
    holds = (cols[None, :, :] == first[:, None, None]).any(axis=2) | (first < 0)[:, None]  # [N, C]
    rows, classes = np.nonzero(holds)
    for s in range(0, rows.size, 16 * _CHUNK):
        r, c = rows[s:s + 16 * _CHUNK], classes[s:s + 16 * _CHUNK]
        differ = _ranked(z[r], wc[c], cols[c]) != ref_rank[r]
        out[r, c] = np.where(differ.any(axis=1), differ.argmax(axis=1), m)
    return out


def margins(logits: Any) -> np.ndarray:
    """``[N, C]``: ``max_{c' != c} logit_c' - logit_c`` (negative only for the top class: its lead)."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    rows = np.arange(z.shape[0])
    top = z.argmax(axis=1)
    best = z[rows, top]
    rest = z.copy()
    rest[rows, top] = -np.inf
    out = best[:, None] - z
    out[rows, top] = rest.max(axis=1) - best
    return out


def _hier_parts(logits: np.ndarray, values: Any, weight: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(g(margin) [N, C], shared prefix with the top class [N, C], the top class's feature count [N])``."""
    if values is None or weight is None:
        raise ConfigError("the hier score needs the model's feature values and class-feature matrix")
    m = margins(logits)
    g = m / (1.0 + np.abs(m))
    top = np.asarray(logits).argmax(axis=1)
    _, counts = class_features(weight)
    return g, shared_prefix(values, weight, top), counts[top]


def _hier_at(parts: tuple[np.ndarray, np.ndarray, np.ndarray], level: int) -> np.ndarray:
    g, spl, need = parts
    inside = spl >= np.minimum(int(level), need)[:, None]
    return g + OUTSIDE * ~inside


def class_scores(score: str, logits: Any, *, values: Any = None, weight: Any = None, level: int = 0) -> np.ndarray:
    """Nonconformity scores ``[N, C]`` (float64) of every class on every image: ``lac``, ``aps`` or ``hier`` (at
    ``level``; needs ``values`` [N, K], the standardized feature values, and ``weight`` [C, K])."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if score == "hier":
        return _hier_at(_hier_parts(z, values, weight), level)
    p = probabilities(z)
    rows = np.arange(z.shape[0])
    if score == "lac":
        top = p.argmax(axis=1)
        out = 1.0 - p
        others = p.copy()
        others[rows, top] = 0.0
        out[rows, top] = others.sum(axis=1)  # 1 - p_top without cancellation
        return out
    if score == "aps":
        order = np.argsort(-p, axis=1, kind="stable")
        out = np.empty_like(p)
        np.put_along_axis(out, order, np.cumsum(np.take_along_axis(p, order, axis=1), axis=1), axis=1)
        return out
    raise ConfigError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


# ------------------------------------------------------------------------------------------------- calibration
def _fit(true_scores: np.ndarray, labels: np.ndarray, n_classes: int, alpha: float, per_class: bool
         ) -> dict[str, Any]:
    """Thresholds from the true-class scores: one (``threshold``) or one per class (``thresholds``)."""
    if not per_class:
        q = exact_threshold(true_scores, alpha)
        return {"n": int(true_scores.size), "rank": conformal_rank(true_scores.size, alpha), "threshold": q,
                "thresholds": None}
    qs, ns = [], []
    for c in range(n_classes):
        own = true_scores[labels == c]
        ns.append(int(own.size))
        qs.append(exact_threshold(own, alpha))
    return {"n": int(true_scores.size), "n_per_class": ns, "threshold": None, "thresholds": qs}


def limits(entry: Mapping[str, Any], n_classes: int) -> np.ndarray:
    """``[C]`` thresholds of a calibration entry (``inf`` where there is none: that class is always in the set)."""
    if entry.get("per_class"):
        return np.array([np.inf if q is None else float(q) for q in entry["thresholds"]], dtype=np.float64)
    q = entry.get("threshold")
    return np.full(n_classes, np.inf if q is None else float(q), dtype=np.float64)


def level_scores(score: str, logits: Any, *, values: Any = None, weight: Any = None) -> dict[int | None, np.ndarray]:
    """The score matrices ``[N, C]`` a calibration chooses from: ``{None: scores}`` for ``lac``/``aps``, ``{L:
    scores at level L}`` for every level ``L = 0..m`` of ``hier``."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if score != "hier":
        return {None: class_scores(score, z)}
    parts = _hier_parts(z, values, weight)
    return {level: _hier_at(parts, level) for level in range(class_features(weight)[0].shape[1] + 1)}


def calibrate_scores(score: str, scores: Mapping[int | None, np.ndarray], labels: Any, alpha: float, *,
                     per_class: bool = False, seed: int = 0) -> dict[str, Any]:
    """A calibration entry from the calibration images' score matrices (:func:`level_scores`) and true ``labels``.

    With one matrix the threshold comes from all n images. With several (``hier``'s levels) the images are split at
    random (``seed``) into two halves: the level is the one with the smallest mean set size on the first half (ties:
    the shallower level: a constraint that does not make sets smaller is not imposed) and the threshold comes from the
    second half alone, so it is exact at n = that half's size.
    """
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    y = np.asarray(labels, dtype=np.int64).ravel()
    n, n_classes = next(iter(scores.values())).shape
    entry: dict[str, Any] = {"alpha": float(alpha), "coverage": coverage_of(alpha), "score": score,
                             "per_class": bool(per_class), "level": None}
    if len(scores) == 1:
        s = next(iter(scores.values()))
        entry.update(_fit(s[np.arange(n), y], y, n_classes, alpha, per_class))
    else:
        perm = np.random.default_rng(int(seed)).permutation(n)
        first, second = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        search = []
        for level, matrix in scores.items():
            s = matrix[first]
            fit = _fit(s[np.arange(first.size), y[first]], y[first], n_classes, alpha, per_class)
            size = (s <= limits({**fit, "per_class": per_class}, n_classes)[None]).sum(axis=1)
            search.append({"level": level, "mean_set_size": float(size.mean()) if size.size else float(n_classes)})
        best = min(search, key=lambda r: (r["mean_set_size"], r["level"]))["level"]
        s = scores[best][second]
        entry.update(level=best, n_level=int(first.size), level_search=search, seed=int(seed))
        entry.update(_fit(s[np.arange(second.size), y[second]], y[second], n_classes, alpha, per_class))
    entry["n_calibration"] = int(n)
    entry["minimum_n"] = minimum_calibration(alpha)
    if per_class:
        entry["too_few_classes"] = [c for c, q in enumerate(entry["thresholds"]) if q is None]
    else:
        entry["too_few"] = entry["threshold"] is None
    return entry


def calibrate(score: str, logits: Any, labels: Any, alpha: float, *, values: Any = None, weight: Any = None,
              per_class: bool = False, seed: int = 0) -> dict[str, Any]:
    """A calibration entry from calibration images' ``logits [n, C]`` and true ``labels [n]`` (and, for ``hier``,
    their standardized feature ``values [n, K]`` and the head's ``weight [C, K]``): alpha, score, the threshold(s)
    and, for ``hier``, the level (:func:`calibrate_scores` on :func:`level_scores`)."""
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    return calibrate_scores(score, level_scores(score, logits, values=values, weight=weight), labels, alpha,
                            per_class=per_class, seed=seed)


def set_members(entry: Mapping[str, Any], logits: Any, *, values: Any = None, weight: Any = None) -> np.ndarray:
    """``[N, C]`` bool: which classes are in each image's set under a calibration entry."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    s = class_scores(entry["score"], z, values=values, weight=weight, level=int(entry.get("level") or 0))
    return s <= limits(entry, z.shape[1])[None]


def evaluate_sets(entry: Mapping[str, Any], logits: Any, labels: Any, *, values: Any = None, weight: Any = None
                  ) -> dict[str, Any]:
    """The sets of labelled images under ``entry``: ``coverage`` (share whose set holds the true class),
    ``set_size`` (mean), ``empty`` and ``all_classes`` (shares), the worst class's coverage, and ``set_coherence``
    (for a sparse head: over images whose set has two or more members, the mean share of the best member's features
    that all members share as a ranked prefix; ``None`` when no set has two members)."""
    z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    y = np.asarray(labels, dtype=np.int64).ravel()
    n, n_classes = z.shape
    member = set_members(entry, z, values=values, weight=weight)
    covered = member[np.arange(n), y]
    size = member.sum(axis=1)
    per_class = {int(c): float(covered[y == c].mean()) for c in np.unique(y)}
    worst = min(per_class, key=lambda c: (per_class[c], c)) if per_class else None
    out = {"n": int(n), "coverage": float(covered.mean()) if n else None,
           "set_size": float(size.mean()) if n else None, "empty": float((size == 0).mean()) if n else None,
           "all_classes": float((size == n_classes).mean()) if n else None,
           "worst_class": worst, "worst_class_coverage": None if worst is None else per_class[worst],
           "set_coherence": None}
    if values is not None and weight is not None and class_features(weight)[0].shape[1] <= TREE_MAX_FEATURES:
        out["set_coherence"] = _coherence(member, z, values, weight)
    return out


def _coherence(member: np.ndarray, logits: np.ndarray, values: Any, weight: Any) -> float | None:
    multi = np.flatnonzero(member.sum(axis=1) >= 2)
    if not multi.size:
        return None
    _, counts = class_features(weight)
    best = np.where(member[multi], logits[multi], -np.inf).argmax(axis=1)
    spl = shared_prefix(np.atleast_2d(values)[multi], weight, best)
    common = np.where(member[multi], spl, np.iinfo(np.int64).max).min(axis=1)
    return float(np.mean(common / np.maximum(counts[best], 1)))


# ------------------------------------------------------------------------------------------ one image's set
def set_feature_label(detail: Mapping[str, Any], feature_id: int) -> str:
    """How a set's text and tree print a feature: the model's label recorded by :func:`prediction_set`
    (:meth:`~qpmcli.modelfile.ClassifierMetadata.feature_label`: ``"f12 red circle"`` once named, else ``"f12"``)."""
    return str((detail.get("feature_labels") or {}).get(str(int(feature_id)), f"f{int(feature_id)}"))


def prediction_set(calibration: Mapping[str, Any], meta: ClassifierMetadata | Mapping[str, Any], logits: Any,
                   features: Any) -> dict[str, Any]:
    """One image's prediction set under a calibration entry (:func:`select_calibration`).

    ``logits [C]`` and ``features [K]`` (pooled, un-standardised) are the model's outputs for the image. Returns
    ``{"coverage", "alpha", "score", "per_class", "level", "set": [class names, best first], "size",
    "members": [{"class", "index", "probability", "score", "ranking", "diverges_at"}], "shared_features",
    "guarantee"}``: for a sparse head, ``ranking`` is a member's features ranked by their contribution on this image,
    ``shared_features`` the ranked prefix all members share and ``diverges_at`` the first feature where a member's
    ranking leaves it (``None``: it ends there), and ``feature_labels`` maps each of those features (``str`` id) to its
    :meth:`~qpmcli.modelfile.ClassifierMetadata.feature_label`. A dense head has ``shared_features`` ``None``.
    """
    md = ClassifierMetadata.coerce(meta)
    z = np.asarray(logits, dtype=np.float64).reshape(1, -1)
    values = md.standardize(np.asarray(features).reshape(1, -1), np.float64)
    cols, _ = class_features(md.weight)
    sparse = cols.shape[1] <= TREE_MAX_FEATURES
    s = class_scores(calibration["score"], z, values=values if sparse else None, weight=md.weight if sparse else None,
                     level=int(calibration.get("level") or 0))[0]
    inside = s <= limits(calibration, z.shape[1])
    p = probabilities(z)[0]
    order = [int(i) for i in np.argsort(-p, kind="stable") if inside[i]]
    source = calibration.get("source") or {}
    out: dict[str, Any] = {
        "coverage": calibration.get("coverage", coverage_of(calibration["alpha"])), "alpha": calibration["alpha"],
        "score": calibration["score"], "per_class": bool(calibration.get("per_class")),
        "level": calibration.get("level"), "set": [md.class_names[i] for i in order], "size": len(order),
        "guarantee": bool(source.get("held_out", False)), "shared_features": None,
        "members": [{"class": md.class_names[i], "index": i, "probability": float(p[i]), "score": float(s[i]),
                     "ranking": None, "diverges_at": None} for i in order],
    }
    if sparse and order:
        ranked = feature_rankings(np.repeat(values, len(order), axis=0), md.weight, order)
        rankings = [[int(md.features[k]) for k in row if k >= 0] for row in ranked]
        shared = rankings[0]
        for r in rankings[1:]:
            n_same = next((j for j, (a, b) in enumerate(zip(shared, r, strict=False)) if a != b),
                          min(len(shared), len(r)))
            shared = shared[:n_same]
        out["shared_features"] = shared
        out["feature_labels"] = {str(f): md.feature_label(f) for f in sorted({f for r in rankings for f in r})}
        for member, r in zip(out["members"], rankings, strict=True):
            member["ranking"] = r
            member["diverges_at"] = r[len(shared)] if len(r) > len(shared) else None
    return out


def select_calibration(meta: ClassifierMetadata | Mapping[str, Any] | None, coverage: float,
                       score: str | None = None, *, model: str = "the model", onnx: bool = False
                       ) -> dict[str, Any]:
    """The calibration entry for ``coverage`` (= 1 - alpha) from a model's metadata (or its calibration document):
    among the entries with that alpha (and ``score`` when given), the one calibrated last. None matching is one
    :class:`ConfigError` line that names the command to run (``model``: the run or file, for the message)."""
    check_coverage(coverage)
    if score is not None and score not in SCORES:
        raise ConfigError(f"--set-score {score!r} is not one of {', '.join(SCORES)}")
    doc = meta.conformal if isinstance(meta, ClassifierMetadata) else meta
    alpha = 1 - _fraction(coverage)
    entries = list((doc or {}).get("calibrations") or [])
    hits = [e for e in entries if _fraction(e["alpha"]) == alpha and (score is None or e["score"] == score)]
    if hits:
        return dict(hits[-1])
    want = f"--alpha {float(alpha):g}" + (f" --score {score}" if score else "")
    todo = (f"run `qpm conformal RUN {want}` and export again (`qpm export RUN --onnx`)" if onnx
            else f"run `qpm conformal {model} {want}`")
    have = ", ".join(f"{e['coverage']:g} ({e['score']}{', per class' if e.get('per_class') else ''})"
                     for e in entries) or "none"
    raise ConfigError(f"{model} has no calibration for coverage {coverage:g}"
                      f"{f' with score {score}' if score else ''} (it has: {have}); {todo}")


def add_calibration(meta: ClassifierMetadata, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The model's calibration document with ``entry`` added last (replacing one with the same alpha, score and
    per-class choice)."""
    doc = dict(meta.conformal or {})
    key = (_fraction(entry["alpha"]), entry["score"], bool(entry.get("per_class")))
    kept = [e for e in doc.get("calibrations") or []
            if (_fraction(e["alpha"]), e["score"], bool(e.get("per_class"))) != key]
    return {"format": CONFORMAL_FORMAT, "format_version": CONFORMAL_FORMAT_VERSION,
            "model": {"fingerprint": model_fingerprint(meta), "classes": meta.n_classes,
                      "features": [int(f) for f in meta.features]},
            "calibrations": [*kept, dict(entry)]}


def check_coverage(coverage: float, flag: str = "--coverage") -> float:
    if not (isinstance(coverage, int | float) and math.isfinite(coverage) and 0 < coverage < 1):
        raise ConfigError(f"{flag} must be a number between 0 and 1 (exclusive), e.g. 0.9, not {coverage}")
    return float(coverage)


def check_alpha(alpha: float, flag: str = "--alpha") -> float:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and 0 < alpha < 1):
        raise ConfigError(f"{flag} must be a number between 0 and 1 (exclusive), e.g. 0.1, not {alpha}")
    return float(alpha)


# --------------------------------------------------------------------------------------- the calibration split
def calibration_split(labels: Any, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit rows, calibration rows)`` of a labelled split, both sorted: a seeded, stratified ``fraction`` of each
    class's images (rounded, at least one image of every class stays for fitting)."""
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise ConfigError(f"--cal-fraction must be between 0 and 1 (exclusive), not {fraction}")
    y = np.asarray(labels, dtype=np.int64).ravel()
    rng = np.random.default_rng(int(seed))
    cal: list[np.ndarray] = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        take = min(rows.size - 1, int(math.floor(fraction * rows.size + 0.5)))
        cal.append(rng.permutation(rows)[:take])
    cal_rows = np.sort(np.concatenate(cal)) if cal else np.zeros(0, np.int64)
    fit_rows = np.setdiff1d(np.arange(y.size), cal_rows)
    return fit_rows, cal_rows


def held_out_split(labels: Any, fraction: float, seed: int) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """``(rows to fit on, the record)`` of the calibration split ``qpm train --cal-fraction`` holds out of every
    fitting step; the record (``fraction``, ``seed``, ``rows``) goes into ``config.json`` as ``calibration_split``
    and :func:`held_out_rows` reads it back. ``fraction`` 0: ``(None, None)``, fit on all (as the paper trains). A
    split that holds out no image is a :class:`DatasetError`."""
    if fraction <= 0:
        return None, None
    fit_rows, cal_rows = calibration_split(labels, fraction, seed)
    if cal_rows.size == 0:
        raise DatasetError(f"--cal-fraction {fraction} holds out no image (too few per class); raise it")
    return fit_rows, {"fraction": fraction, "seed": seed, "rows": [int(r) for r in cal_rows]}


def held_out_rows(record: Mapping[str, Any], n: int, source: str) -> np.ndarray:
    """The sorted calibration rows of a ``calibration_split`` record, checked against the ``n``-image train cache
    (``source`` names the file in the one-line :class:`ArtifactError`)."""
    try:
        rows = np.asarray(record["rows"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source} has a malformed calibration_split: {exc!r}") from exc
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= n)) or np.unique(rows).size != rows.size:
        raise ArtifactError(f"{source}'s calibration_split rows do not fit the {n}-image train cache")
    return np.sort(rows)


def fitting_rows(record: Mapping[str, Any] | None, n: int, source: str) -> np.ndarray | None:
    """The rows of an ``n``-image train cache that a run may fit on: ``None`` (all) without a calibration split
    (``record``: :meth:`qpmcli.artifact.RunFolder.calibration_split`), else those outside it. ``qpm edit`` and
    ``qpm add-class`` fit only on these, so a child run's calibration split stays unseen."""
    return None if not record else np.setdiff1d(np.arange(n), held_out_rows(record, n, source))


# -------------------------------------------------------------------------------------------- synthetic outputs
def synthetic_outputs(n: int, n_classes: int = 20, n_features: int = 50, per_class: int = 5, *, seed: int = 0,
                      spread: Sequence[float] = (0.6, 2.0)) -> dict[str, np.ndarray]:
    """Class-structured model outputs for tests and benchmarks: a binary ``weight [C, K]`` with ``per_class``
    features per class, standardized feature ``values [n, K]`` (a class's own features raised by a per-class
    strength drawn from ``spread``, so classes differ in difficulty), ``logits = values @ W.T`` and ``labels``."""
    rng = np.random.default_rng(seed)
    weight = np.zeros((n_classes, n_features), np.float32)
    for c in range(n_classes):
        weight[c, rng.choice(n_features, per_class, replace=False)] = 1.0
    strength = rng.uniform(*spread, n_classes)
    labels = rng.integers(0, n_classes, n)
    values = rng.normal(size=(n, n_features)) + strength[labels, None] * weight[labels]
    return {"weight": weight, "values": values, "logits": values @ weight.T.astype(np.float64), "labels": labels}


__all__ = [
    "OUTSIDE", "SCORES", "add_calibration", "calibrate", "calibrate_scores", "calibration_split", "check_alpha",
    "check_coverage", "class_features", "class_scores", "conformal_rank", "coverage_of", "evaluate_sets",
    "exact_threshold", "feature_rankings", "fitting_rows", "held_out_rows", "held_out_split", "level_scores", "limits",
    "margins", "minimum_calibration", "prediction_set", "probabilities", "select_calibration", "set_feature_label",
    "set_members", "shared_prefix", "synthetic_outputs",
]
