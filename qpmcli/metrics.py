"""Interpretability metrics of DINO-QPM (METHOD.md §8 with the §13 corrections), on plain arrays.

These definitions exist in no library; they are exposed here so that users can score their own models. This module is
their public face: the metrics on logits and train features live here, the metrics on test feature maps in
:mod:`qpmcli.mapmetrics`, the names and presets in :mod:`qpmcli.metricnames`, the patch masks in :mod:`qpmcli.masks`.
Every function takes numpy arrays or torch tensors and returns plain Python floats.

==========================  =====================================================  ==================================
JSON key (compute_metrics)  definition (function)                                  range, better
==========================  =====================================================  ==================================
Accuracy                    argmax(logits) == label (:func:`accuracy`)             [0, 1], higher
SID@5                       (1/k) sum_p max_{j in top-k} softmax_p(M_j / mean|M_j|)  [1/k, 1], higher (0 if no image
                            (:func:`sid_at_k`)                                     is eligible)
Class-Independence          1 - mean_j max_c P_cj (:func:`class_independence`)      [0, 1), lower = class-specific
Contrastiveness             1 - mean_j OVL(2-component GMM) (:func:`contrastiveness`)  [0, 1], higher
Correlation                 mean_j max_i cos(F_i, F_j) (:func:`correlation`)        [0, 1] for F >= 0, lower
Structural-Grounding        sum cos(W) / sum cos(attributes) on the top-50 pairs    >= 0 for W >= 0, 1 = matches
                            (:func:`structural_grounding`)
Alignment                   mean_j max_a (mean F_j | a - mean F_j | not a) / scale   unbounded, higher
                            (:func:`alignment`, :func:`alignment_matrix`)
Plausibility                = SegOverlap-gradcam_dilated (:func:`plausibility`)     [0, 1], higher
SegOverlap-<variant>        mass / peak of the maps inside the object mask          [0, 1], higher
                            (:func:`segmentation_overlap`)
Pooling-Avg/Max-Accuracy    head applied to mean / max pooled maps                   [0, 1]
Pooling-Ratio               max(avg, max) / Accuracy (:func:`pooling_baseline`)      >= 0
NFeatures, PerClass         features with a class; non-zero weights per class        counts
==========================  =====================================================  ==================================

Fractions are reported as fractions; the paper's tables show them x100. ``None`` means "not applicable" (no masks,
no attributes, an undefined value), never a faked number.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qpmcli.mapmetrics import (  # noqa: F401  (the map metrics are part of this public module)
    MAP_KEY_PREFIXES,
    TestMapScorer,
    chunk_size,
    map_scorer,
    plausibility,
    pooling_baseline,
    predictions,
    segmentation_overlap,
    segmentation_overlap_per_image,
    sid_at_k,
    sid_per_image,
    top_k_features,
)
from qpmcli.masks import dilate, patch_mask  # noqa: F401  (masks at the token grid, for users' own test sets)
from qpmcli.masks import to_numpy as _to_numpy
from qpmcli.metricnames import (  # noqa: F401  (the names, groups and presets of the metrics)
    ALL_KEYS,
    METRIC_GROUPS,
    PRESETS,
    SEG_VARIANTS,
    SET_KEYS,
    SET_METRIC_GROUPS,
    checked_metric_names,
    resolve_metric_names,
)


def relevant_features(weight: Any) -> np.ndarray:
    """Indices of the head's input features that have at least one non-zero class weight (METHOD.md §13 C15).

    All features of a dense head; normally the 50 selected ones of a QPM head (fewer if the solver left one unused).
    """
    w = _to_numpy(weight)
    return np.flatnonzero(np.any(w != 0, axis=0))


def tokens_to_maps(tokens: Any, grid: tuple[int, int]) -> Any:
    """Backbone tokens ``[B, 1 + h*w, D]`` (CLS first) -> patch maps ``[B, D, h, w]``: the "DINO GradCAM" maps.

    With these maps and a linear CLS probe's weight ``[C, D]`` the segmentation-overlap metrics reproduce the
    paper's plausibility of the DINOv2 linear probe (METHOD.md §8).
    """
    h, w = int(grid[0]), int(grid[1])
    patches = tokens[:, 1:]
    if patches.shape[1] != h * w:
        raise ValueError(f"expected 1 + {h * w} tokens for a {h}x{w} grid, got {tokens.shape[1]}")
    if hasattr(patches, "transpose") and hasattr(patches, "detach"):
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    return np.ascontiguousarray(np.swapaxes(patches, 1, 2)).reshape(tokens.shape[0], tokens.shape[2], h, w)


# ====================================================================================================================
# Metrics on logits and train features
# ====================================================================================================================

def accuracy(logits: Any, labels: Any) -> float:
    """Fraction of samples whose first maximal logit is the label. Range [0, 1]."""
    lab = _to_numpy(labels).astype(np.int64).ravel()
    if lab.size == 0:
        raise ValueError("accuracy needs at least one sample")
    return float(np.mean(predictions(logits) == lab))


def confusion(predicted: Any, labels: Any, n_classes: int) -> dict[str, Any]:
    """The confusion matrix ``matrix[true][predicted]`` (counts, scikit-learn's), each class's accuracy (its
    diagonal over its row; ``None`` for a class without samples) and its support: ``qpm evaluate`` and ``qpm serve``'s
    ``/api/confusion`` read per-class accuracy from here."""
    from sklearn.metrics import confusion_matrix

    lab = _to_numpy(labels).astype(np.int64).ravel()
    matrix = confusion_matrix(lab, _to_numpy(predicted).astype(np.int64).ravel(), labels=np.arange(n_classes))
    support = matrix.sum(axis=1)
    per_class = [None if support[i] == 0 else float(matrix[i, i] / support[i]) for i in range(n_classes)]
    return {"matrix": matrix, "per_class_accuracy": per_class, "support": support}


def class_independence(features: Any, labels: Any, n_classes: int | None = None) -> float:
    """Class-Independence (METHOD.md §8 with §13 C14). Range [0, 1); lower = more class-specific features.

    G_ij = F_ij - min_i' F_i'j (i = train image, j = feature), P_cj = sum_{i: y_i = c} G_ij / max(sum_i G_ij, 1e-8),
    CI = 1 - mean_j max_c P_cj. Perfectly class-specific features (each fires for one class only) give 0. A dead
    (constant) feature has P = 0 for every class and so counts as fully independent, as in the reference.
    """
    f = _to_numpy(features).astype(np.float64)
    y = _to_numpy(labels).astype(np.int64).ravel()
    if f.ndim != 2 or f.shape[0] != y.size or y.size == 0:
        raise ValueError(f"class_independence needs features [N, K] and labels [N], got {f.shape} and {y.shape}")
    c = int(n_classes if n_classes is not None else y.max() + 1)
    g = f - f.min(axis=0, keepdims=True)
    order = np.argsort(y, kind="stable")
    ys = y[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    per_class = np.zeros((c, f.shape[1]))
    per_class[ys[starts]] = np.add.reduceat(g[order], starts, axis=0)
    p = per_class / np.maximum(g.sum(axis=0), 1e-8)
    return float(1.0 - p.max(axis=0).mean())


def correlation(features: Any) -> float:
    """Mean over features of the highest cosine similarity to another feature column (uncentred). Lower is better.

    Columns are normalised with a 1e-8 norm floor, the diagonal of the similarity matrix is set to 0, then
    mean_j max_i S_ij. Range [0, 1] for non-negative features. Not shift-invariant (METHOD.md §8).
    """
    f = _to_numpy(features).astype(np.float64)
    if f.ndim != 2:
        raise ValueError(f"correlation needs features [N, K], got {f.shape}")
    if f.shape[1] < 2:
        return 0.0
    unit = f / np.maximum(np.linalg.norm(f, axis=0, keepdims=True), 1e-8)
    sim = unit.T @ unit
    np.fill_diagonal(sim, 0.0)
    return float(sim.max(axis=1).mean())


def _gmm2_fit_1d(x: np.ndarray, init_labels: np.ndarray, *, tol: float = 1e-3, reg_covar: float = 1e-6,
                 max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """sklearn ``GaussianMixture(2)`` EM on many 1-D problems at once: x [K, N], init_labels [K, N] in {0, 1}.

    Same arithmetic as sklearn 1.x (responsibility init from labels, nk + 10 eps, reg_covar, mean log-likelihood
    lower bound, stop when its change < tol); each column stops on its own. Returns means, variances [K, 2].
    """
    k, n = x.shape
    eps10 = 10 * np.finfo(np.float64).eps
    resp1 = init_labels.astype(np.float64)
    resp = np.stack([1.0 - resp1, resp1], axis=1)  # [K, 2, N]

    def m_step(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nk = r.sum(axis=2) + eps10
        mu = np.einsum("kcn,kn->kc", r, x) / nk
        var = np.einsum("kcn,kcn->kc", r, (x[:, None, :] - mu[:, :, None]) ** 2) / nk + reg_covar
        return nk, mu, var

    nk, mu, var = m_step(resp)
    weights = nk / n
    lower = np.full(k, -np.inf)
    active = np.ones(k, dtype=bool)
    log2pi = np.log(2 * np.pi)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa = x[idx]
        prec = 1.0 / np.sqrt(var[idx])  # the 1x1 precision Cholesky factor
        y = (xa[:, None, :] - mu[idx][:, :, None]) * prec[:, :, None]
        wlp = -0.5 * (log2pi + y * y) + np.log(prec)[:, :, None] + np.log(weights[idx])[:, :, None]
        top = wlp.max(axis=1, keepdims=True)
        norm = np.log(np.exp(wlp - top).sum(axis=1, keepdims=True)) + top
        r = np.exp(wlp - norm)
        nk_a = r.sum(axis=2) + eps10
        mu_a = np.einsum("kcn,kn->kc", r, xa) / nk_a
        var_a = np.einsum("kcn,kcn->kc", r, (xa[:, None, :] - mu_a[:, :, None]) ** 2) / nk_a + reg_covar
        mu[idx], var[idx] = mu_a, var_a
        weights[idx] = nk_a / nk_a.sum(axis=1, keepdims=True)
        new_lower = norm[:, 0, :].mean(axis=1)
        done = np.abs(new_lower - lower[idx]) < tol
        lower[idx] = new_lower
        active[idx[done]] = False
    return mu, var


def _two_means_labels(x: np.ndarray) -> np.ndarray:
    """Optimal 1-D 2-means partition of every row of x [K, N] (labels in {0, 1}; all 0 when a row is constant).

    In 1-D the k-means optimum is a threshold split, found exactly by scanning the sorted values. This replaces
    sklearn's randomly initialised KMeans (whose Lloyd iterations end at this split on ordinary data) by a
    deterministic, seed-free initialisation.
    """
    k, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    csum = np.cumsum(xs, axis=1)
    csq = np.cumsum(xs * xs, axis=1)
    left_n = np.arange(1, n, dtype=np.float64)
    right_n = n - left_n
    left_s, left_q = csum[:, :-1], csq[:, :-1]
    right_s, right_q = csum[:, -1:] - left_s, csq[:, -1:] - left_q
    sse = (left_q - left_s ** 2 / left_n) + (right_q - right_s ** 2 / right_n)
    sse = np.where(xs[:, 1:] > xs[:, :-1], sse, np.inf)  # split only between distinct values
    best = np.argmin(sse, axis=1)
    labels = np.zeros((k, n), dtype=np.int8)
    valid = np.isfinite(sse[np.arange(k), best])
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[None, :].repeat(k, 0), axis=1)
    labels[valid] = (ranks[valid] > best[valid, None]).astype(np.int8)
    return labels


def _overlap(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Overlap coefficient of N(mu0, var0) and N(mu1, var1) per row (``statistics.NormalDist.overlap``)."""
    from statistics import NormalDist

    out = np.empty(mu.shape[0])
    for j in range(mu.shape[0]):
        a = NormalDist(float(mu[j, 0]), float(np.sqrt(var[j, 0])))
        b = NormalDist(float(mu[j, 1]), float(np.sqrt(var[j, 1])))
        out[j] = a.overlap(b)
    return out


def contrastiveness(features: Any, seed: int = 0, backend: str = "fast") -> float:
    """Contrastiveness (METHOD.md §8, §13 C13): 1 - mean_j OVL_j. Range [0, 1]; 1 = every feature is bimodal.

    Per feature j a 2-component Gaussian mixture is fitted to its 1-D train values and OVL_j is the overlap
    coefficient of the two fitted normals (mixture weights ignored).

    backend "fast" (default): all features at once, sklearn's EM arithmetic exactly, initialised with the exact
    1-D 2-means split (deterministic; ``seed`` is unused). backend "sklearn": ``GaussianMixture(n_components=2,
    random_state=seed)`` per feature, the reference's code with an explicit seed (slow: ~0.1 s per feature).
    Both agree on ordinary data. Degenerate features follow sklearn: a constant-zero feature gives OVL 1, a
    constant non-zero one gives OVL 0 (one component keeps the value, the empty one sits at 0).
    """
    f = _to_numpy(features).astype(np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"contrastiveness needs features [N >= 2, K], got {f.shape}")
    if f.shape[1] == 0:
        raise ValueError("contrastiveness needs at least one feature")
    if backend == "sklearn":
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        mu = np.empty((f.shape[1], 2))
        var = np.empty((f.shape[1], 2))
        import warnings

        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j in range(f.shape[1]):
                gmm = GaussianMixture(n_components=2, random_state=seed).fit(f[:, j:j + 1])
                mu[j], var[j] = gmm.means_.ravel(), gmm.covariances_.ravel()
    elif backend == "fast":
        x = np.ascontiguousarray(f.T)
        mu_parts, var_parts = [], []
        step = max(1, 2_000_000 // max(1, x.shape[1]))  # bounded memory for [K, 2, N] temporaries
        for s in range(0, x.shape[0], step):
            m, v = _gmm2_fit_1d(x[s:s + step], _two_means_labels(x[s:s + step]))
            mu_parts.append(m)
            var_parts.append(v)
        mu, var = np.concatenate(mu_parts), np.concatenate(var_parts)
    else:
        raise ValueError(f"unknown contrastiveness backend {backend!r}; use 'fast' or 'sklearn'")
    return float(1.0 - _overlap(mu, var).mean())


def structural_grounding(weight: Any, class_attributes: Any, top: int = 50) -> float:
    """Structural Grounding (METHOD.md §8): do classes that share attributes share features? Higher is better.

    1 when the class-weight similarity equals the attribute similarity on the most similar pairs; >= 0 for
    non-negative weights and attributes, and it can exceed 1 when those classes share more features than attributes.

    S = cos(W_c, W_c') between class rows of the head weight, GT = cos between rows of the class-attribute matrix
    (e.g. CUB's ``class_attribute_labels_continuous.txt``), both with a zero diagonal. Over the ``top`` largest GT
    entries of the flattened C x C matrix (each pair counted twice): sum S / sum GT. Like the reference there is no
    epsilon: a class with an all-zero row, or attributes that no two classes share (sum GT = 0), give NaN
    (:func:`compute_metrics` reports that as None). The attribute matrix must have one row per class (C6).
    """
    w = _to_numpy(weight).astype(np.float64)
    a = _to_numpy(class_attributes).astype(np.float64)
    if a.ndim != 2 or a.shape[0] != w.shape[0]:
        raise ValueError(f"class attributes must be [C={w.shape[0]}, A], got {a.shape}")

    def cos(m: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            u = m / np.linalg.norm(m, axis=1, keepdims=True)
        s = u @ u.T
        np.fill_diagonal(s, 0.0)
        return s

    s, gt = cos(w).ravel(), cos(a).ravel()
    k = min(int(top), gt.size)
    idx = np.argsort(-np.nan_to_num(gt, nan=-np.inf), kind="stable")[:k]
    den = gt[idx].sum()
    return float(s[idx].sum() / den) if den != 0 else float("nan")


def alignment_matrix(features: Any, present: Any, known: Any = None) -> np.ndarray:
    """``M [K, A]`` (float64): how much more feature j fires on images with attribute a than on images without it,
    as the reference's alignment metric defines it (METHOD.md §8, ``metrics/cub_Alignment.py``).

    ``M[j, a] = (mean of F_j over the images whose label for a is known and present - mean over those whose label is
    known and absent) / mean_i(F_ij - min_i F_ij)``. ``features [N, K]``; ``present [N, A]`` bool; ``known [N, A]``
    bool marks the labels the dataset is sure of (CUB: certainty >= 3); ``None`` = every label is known. An
    unknown label puts the image in neither group. As in the reference, an empty group's mean is 0 and the
    normaliser (over all N images) has no epsilon: a constant feature gives a non-finite row.

    This is the one owner of M: :func:`alignment` and ``qpm name-features`` (:mod:`qpmcli.naming`) both use it.
    """
    f = _to_numpy(features).astype(np.float64)
    att = _to_numpy(present).astype(bool)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, K], got {f.shape}")
    if att.ndim != 2 or att.shape[0] != f.shape[0]:
        raise ValueError(f"image attributes must be [N={f.shape[0]}, A], got {att.shape}")
    if known is None:
        pos, neg = att, ~att
    else:
        k = _to_numpy(known).astype(bool)
        if k.shape != att.shape:
            raise ValueError(f"the known mask must have the attributes' shape {att.shape}, got {k.shape}")
        pos, neg = att & k, ~att & k
    n_pos, n_neg = pos.sum(axis=0), neg.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_pos = np.where(n_pos > 0, (f.T @ pos.astype(np.float64)) / np.maximum(n_pos, 1), 0.0)
        mean_neg = np.where(n_neg > 0, (f.T @ neg.astype(np.float64)) / np.maximum(n_neg, 1), 0.0)
        scale = (f - f.min(axis=0)).mean(axis=0)
        return (mean_pos - mean_neg) / scale[:, None]


def alignment(features: Any, image_attributes: Any, known: Any = None) -> float:
    """CUB attribute alignment (METHOD.md §8): how well each feature matches one human attribute. Higher is better;
    unbounded (a feature that fires exactly on one attribute present in a fraction q of images scores 1/q).

    ``mean_j max_a M[j, a]`` of :func:`alignment_matrix` (see there for ``known``: CUB's certainty >= 3 mask).
    Like the reference, whose attribute columns run up to the largest attribute id with a known label, trailing
    attributes that are never known are left out; a constant feature makes the score non-finite (reported as
    not applicable by :func:`compute_metrics`).
    """
    att = _to_numpy(image_attributes).astype(bool)
    if att.ndim != 2 or att.shape[1] == 0:
        raise ValueError(f"image attributes must be [N, A] with A >= 1, got {att.shape}")
    k = None if known is None else _to_numpy(known).astype(bool)
    seen = np.flatnonzero((k if k is not None else np.ones_like(att)).any(axis=0))
    if not seen.size:
        raise ValueError("no attribute label is known")
    width = int(seen[-1]) + 1
    m = alignment_matrix(features, att[:, :width], None if k is None else k[:, :width])
    return float(m.max(axis=1).mean())


def finish_metrics(keys: list[str], *, train_features: Any, train_labels: Any, test_logits: Any, test_labels: Any,
                   weight: Any, class_attributes: Any = None, image_attributes: Any = None,
                   image_attribute_known: Any = None, seed: int = 0,
                   scorer: TestMapScorer | None = None) -> dict[str, float | None]:
    """The metrics ``keys`` from train features, test logits and an already fed :class:`TestMapScorer`.

    This is :func:`compute_metrics` for callers that stream test maps batch by batch (``qpmcli.evaluate``).
    """
    w = _to_numpy(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be [C, K], got {w.shape}")
    c, k_all = w.shape
    rel = relevant_features(w)
    logits = _to_numpy(test_logits)
    y_test = _to_numpy(test_labels).astype(np.int64).ravel()
    if logits.shape != (y_test.size, c):
        raise ValueError(f"test logits must be [M={y_test.size}, C={c}], got {logits.shape}")
    acc = accuracy(logits, y_test)
    f_rel = None
    if {"Class-Independence", "Contrastiveness", "Correlation", "Alignment"} & set(keys):
        f = _to_numpy(train_features)
        if f.ndim != 2 or f.shape[1] != k_all:
            raise ValueError(f"train features must be [N, K={k_all}], got {f.shape}")
        f_rel = np.asarray(f[:, rel], dtype=np.float64)
    y_train = _to_numpy(train_labels).astype(np.int64).ravel()
    out: dict[str, float | None] = {}
    for key in keys:
        if key == "Accuracy":
            out[key] = acc
        elif key == "Class-Independence":
            out[key] = class_independence(f_rel, y_train, c) if rel.size else None
        elif key == "Contrastiveness":
            out[key] = contrastiveness(f_rel, seed=seed) if rel.size else None
        elif key == "Correlation":
            out[key] = correlation(f_rel) if rel.size else None
        elif key == "Structural-Grounding":
            sg = None if class_attributes is None else structural_grounding(w, class_attributes)
            out[key] = sg if sg is None or np.isfinite(sg) else None
        elif key == "Alignment":
            al = None if image_attributes is None or not rel.size else \
                alignment(f_rel, image_attributes, image_attribute_known)
            out[key] = al if al is None or np.isfinite(al) else None
        elif key == "NFeatures":
            out[key] = float(rel.size)
        elif key == "PerClass":
            out[key] = float((w != 0).sum() / c)
    if scorer is not None:
        if scorer.n != y_test.size:
            raise ValueError(f"the map scorer saw {scorer.n} test images, the logits hold {y_test.size}")
        out.update(scorer.result(actual_accuracy=acc))
    return {k: out.get(k) for k in keys}


def compute_metrics(*, train_features: Any, train_labels: Any, test_logits: Any, test_labels: Any, test_maps: Any,
                    weight: Any, test_masks: Any = None, class_attributes: Any = None, image_attributes: Any = None,
                    image_attribute_known: Any = None, which: str | list[str] = "all", seed: int = 0,
                    head_mean: Any = None, head_std: Any = None, head_bias: Any = None,
                    device: Any = None) -> dict[str, float | None]:
    """All requested metrics of METHOD.md §8 for one model, as fractions (the paper's tables show x100).

    train_features [N, K] pooled, un-standardised, no dropout; train_labels [N]; test_logits [M, C];
    test_labels [M]; test_maps [M, K, h, w] (any array or memmap, e.g. fp16; read in chunks); weight [C, K] the
    head's class-feature matrix; test_masks [M, h, w] bool at patch resolution (see :func:`patch_mask`);
    class_attributes [C, A]; image_attributes [N, A] bool (train images) and image_attribute_known [N, A] bool, the
    labels the dataset is sure of (CUB: certainty >= 3; None = all). head_mean/head_std/head_bias describe the
    full head for the pooling baseline (defaults: none, i.e. logits = maps_pooled @ W.T).

    Train-feature metrics use only the relevant features (columns of W with a non-zero entry, §13 C15).
    Metrics whose inputs are missing are ``None`` ("not applicable"); unrequested metrics are absent.
    """
    keys = resolve_metric_names(which)
    w = _to_numpy(weight)
    scorer = map_scorer(w, keys, head_mean=head_mean, head_std=head_std, head_bias=head_bias, device=device)
    if scorer is not None:
        y_test = _to_numpy(test_labels).astype(np.int64).ravel()
        maps = test_maps
        if maps is None or maps.shape[0] != y_test.size or maps.shape[1] != w.shape[1]:
            raise ValueError(f"test maps must be [M={y_test.size}, K={w.shape[1]}, h, w], got "
                             f"{None if maps is None else tuple(maps.shape)}")
        masks = None if test_masks is None else _to_numpy(test_masks)
        pred = predictions(test_logits)
        step = chunk_size(w.shape[1], int(np.prod(maps.shape[2:])))
        for s in range(0, y_test.size, step):
            e = min(s + step, y_test.size)
            chunk = maps[s:e] if hasattr(maps, "detach") else np.asarray(maps[s:e])
            scorer.update(pred[s:e], y_test[s:e], chunk, None if masks is None else masks[s:e])
    return finish_metrics(keys, train_features=train_features, train_labels=train_labels, test_logits=test_logits,
                          test_labels=test_labels, weight=w, class_attributes=class_attributes,
                          image_attributes=image_attributes, image_attribute_known=image_attribute_known,
                          seed=seed, scorer=scorer)
