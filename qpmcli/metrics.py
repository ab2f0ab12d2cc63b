"""Interpretability metrics of DINO-QPM (METHOD.md §8 with the §13 corrections), on plain arrays.

These definitions exist in no library; they are exposed here so that users can score their own models.
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

from qpmcli.modelfile import SIGMA_MIN

# OpenCV's fixed-point bilinear resize for 8-bit images (imgproc/src/resize.cpp): 11 fractional bits per axis.
_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or (CPU/GPU) torch tensor, without importing torch."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _linear_taps(src: int, dst: int, clamp_low: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source index pairs and 11-bit weights of OpenCV INTER_LINEAR along one axis.

    Mirrors `cv::hal::resize`: fx = float((d + 0.5) * scale - 0.5), sx = floor(fx), weights rounded with cvRound
    (half to even) from float32, the x axis clamped at both borders, the y axis only by clipping the row index.
    """
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_low:
        low = s < 0
        f[low], s[low] = 0.0, 0
        high = s >= src - 1
        f[high], s[high] = 0.0, src - 1
    w0 = np.rint((np.float32(1.0) - f) * np.float32(_COEF_SCALE)).astype(np.int64)
    w1 = np.rint(f * np.float32(_COEF_SCALE)).astype(np.int64)
    i0 = np.clip(s, 0, src - 1)
    i1 = np.clip(s + 1, 0, src - 1)
    return i0, i1, np.stack([w0, w1])


def _cv2_resize_linear_u8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bit-exact numpy emulation of `cv2.resize(img_u8, (out_w, out_h), interpolation=INTER_LINEAR)` (1 channel)."""
    h, w = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    if h == 2 * out_h and w == 2 * out_w:
        # OpenCV switches an exact 2x INTER_LINEAR shrink to INTER_AREA's fast path: (sum of 2x2 + 2) >> 2.
        blocks = img.astype(np.int64).reshape(out_h, 2, out_w, 2).sum(axis=(1, 3))
        return ((blocks + 2) >> 2).astype(np.uint8)
    src = img.astype(np.int64)
    x0, x1, wx = _linear_taps(w, out_w, clamp_low=True)
    y0, y1, wy = _linear_taps(h, out_h, clamp_low=False)
    rows = np.unique(np.concatenate([y0, y1]))
    lut = np.zeros(h, dtype=np.int64)
    lut[rows] = np.arange(rows.size)
    horiz = src[rows][:, x0] * wx[0] + src[rows][:, x1] * wx[1]  # HResizeLinear, int32 in OpenCV
    top, bottom = horiz[lut[y0]] >> 4, horiz[lut[y1]] >> 4
    # VResizeLinear<uchar>: ((b0*(S0>>4))>>16) + ((b1*(S1>>4))>>16) + 2) >> 2, identical in its SIMD path.
    out = ((wy[0][:, None] * top) >> 16) + ((wy[1][:, None] * bottom) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def patch_mask(mask: Any, grid: tuple[int, int] = (16, 16)) -> np.ndarray:
    """Object mask at patch resolution, by the reference's rule (METHOD.md §13 C1).

    The full-resolution mask is turned into a uint8 0/255 image, resized straight to the patch grid with OpenCV's
    INTER_LINEAR (emulated bit-exactly here, no OpenCV needed) and thresholded at > 0. INTER_LINEAR does not
    anti-alias when shrinking, so a patch is foreground iff the bilinear sample near its centre is non-zero: this is
    *not* "any annotated pixel in the patch".

    mask: bool (or 0/non-0) array [H, W]; grid: (h, w) patch rows and columns. Returns bool [h, w].
    """
    arr = _to_numpy(mask)
    if arr.ndim != 2:
        raise ValueError(f"patch_mask expects one [H, W] mask, got shape {tuple(arr.shape)}")
    out_h, out_w = int(grid[0]), int(grid[1])
    if out_h <= 0 or out_w <= 0 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"patch_mask needs a non-empty mask and a positive grid, got {arr.shape} -> {grid}")
    img = np.where(arr.astype(bool), np.uint8(255), np.uint8(0))
    return _cv2_resize_linear_u8(img, out_h, out_w) > 0


def dilate(mask: Any) -> np.ndarray:
    """`cv2.dilate(mask, np.ones((3, 3)), iterations=1)`: grow a bool mask by one cell in all 8 directions.

    Works on [h, w] or batched [..., h, w] masks; cells outside the border count as background.
    """
    m = _to_numpy(mask).astype(bool)
    padded = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    h, w = m.shape[-2:]
    out = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            out |= padded[..., dy : dy + h, dx : dx + w]
    return out


# ====================================================================================================================
# Names, groups and presets
# ====================================================================================================================

SEG_VARIANTS = ("gradcam", "gradcam_dilated", "gradcam_max", "gradcam_max_dilated", "max", "max_dilated")
"""Segmentation-overlap variants (METHOD.md §8); ``gradcam_dilated`` is the paper's Plausibility."""

METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "accuracy": ("Accuracy",),
    "sid": ("SID@5",),
    "class_independence": ("Class-Independence",),
    "contrastiveness": ("Contrastiveness",),
    "correlation": ("Correlation",),
    "structural_grounding": ("Structural-Grounding",),
    "alignment": ("Alignment",),
    "segmentation_overlap": ("Plausibility",) + tuple(f"SegOverlap-{v}" for v in SEG_VARIANTS),
    "pooling_baseline": ("Pooling-Avg-Accuracy", "Pooling-Max-Accuracy", "Pooling-Ratio"),
    "sparsity": ("NFeatures", "PerClass"),
}
"""Metric ids (the reference's registry ids, lower case) and the JSON keys each one produces."""

ALL_KEYS: tuple[str, ...] = tuple(k for keys in METRIC_GROUPS.values() for k in keys)

SET_METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "coverage": ("Coverage",),
    "set_size": ("Set-Size",),
    "set_coherence": ("Set-Coherence",),
}
"""Prediction-set metrics of a calibrated run (``qpm conformal``; not METHOD.md §8): computed by
:func:`qpmcli.evaluate.evaluate_model` from a calibration, ``None`` here. ``qpm evaluate`` adds them to ``all`` when
the run has a calibration."""
SET_KEYS: tuple[str, ...] = tuple(k for keys in SET_METRIC_GROUPS.values() for k in keys)

PRESETS: dict[str, tuple[str, ...]] = {
    "all": tuple(METRIC_GROUPS),
    # the reference's "fast": everything but the expensive SID, Contrastiveness and segmentation overlap
    "fast": ("accuracy", "class_independence", "correlation", "structural_grounding", "alignment",
             "pooling_baseline", "sparsity"),
    "essential": ("accuracy", "correlation", "class_independence", "sparsity"),
}

_ALIASES = {"diversity": "sid", "sid@5": "sid", "cub_alignment": "alignment",
            "cub_segmentation_overlap": "segmentation_overlap", "segoverlap": "segmentation_overlap",
            "classindependence": "class_independence", "structuralgrounding": "structural_grounding"}


def resolve_metric_names(which: str | list[str] | tuple[str, ...] = "all") -> list[str]:
    """JSON keys for ``which``: a preset (all, fast, essential), metric ids or JSON keys, as a list or comma list.

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    items = [w.strip() for w in which.split(",")] if isinstance(which, str) else [str(w).strip() for w in which]
    by_lower = {k.lower(): k for k in (*ALL_KEYS, *SET_KEYS)}
    groups = {**METRIC_GROUPS, **SET_METRIC_GROUPS}
    keys: list[str] = []
    for item in (i for i in items if i):
        low = item.lower()
        low = _ALIASES.get(low, _ALIASES.get(low.replace("-", "").replace("_", ""), low))
        if low in PRESETS:
            new = [k for g in PRESETS[low] for k in METRIC_GROUPS[g]]
        elif low.replace("-", "_") in groups:
            new = list(groups[low.replace("-", "_")])
        elif low in by_lower:
            new = [by_lower[low]]
        else:
            raise ValueError(f"unknown metric {item!r}; use all, fast, essential, one of "
                             f"{', '.join(groups)} or a key such as {', '.join(ALL_KEYS[:3])}")
        keys += [k for k in new if k not in keys]
    if not keys:
        raise ValueError("no metric requested; use all, fast, essential or metric names")
    return [k for k in (*ALL_KEYS, *SET_KEYS) if k in keys]


# ====================================================================================================================
# Helpers
# ====================================================================================================================

def checked_metric_names(which: str | list[str] | tuple[str, ...], flag: str = "--metrics") -> list[str]:
    """:func:`resolve_metric_names`, with an unknown name as a one-line ``ConfigError`` listing the valid ones (the
    check every job makes before any work)."""
    from qpmcli.errors import ConfigError

    try:
        return resolve_metric_names(which)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def relevant_features(weight: Any) -> np.ndarray:
    """Indices of the head's input features that have at least one non-zero class weight (METHOD.md §13 C15).

    All features of a dense head; normally the 50 selected ones of a QPM head (fewer if the solver left one unused).
    """
    w = _to_numpy(weight)
    return np.flatnonzero(np.any(w != 0, axis=0))


def predictions(logits: Any) -> np.ndarray:
    """Predicted classes: the first maximal logit on ties (numpy argmax, as torch does on the reference's data)."""
    return np.argmax(_to_numpy(logits), axis=1)


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


# ====================================================================================================================
# Metrics on test feature maps (batched; summed over chunks so that memmaps and model outputs can stream through)
# ====================================================================================================================

def _torch():
    import torch

    return torch


def _as_tensor(x: Any, device: Any = None, dtype: Any = None):
    torch = _torch()
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.ascontiguousarray(_to_numpy(x))
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # memmaps are read-only
    return t.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else t


def top_k_features(weight: Any, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the k highest raw weights' feature indices [C, k] (ties: lower index first) and eligibility [C].

    A class is eligible for SID@k when it has at least k non-zero weights (METHOD.md §8).
    """
    w = _to_numpy(weight).astype(np.float64)
    k = min(int(k), w.shape[1])
    order = np.argsort(-w, axis=1, kind="stable")[:, :k]
    return order, (w != 0).sum(axis=1) >= int(k)


def sid_per_image(maps: Any, top_idx: Any) -> Any:
    """SID@k of each image (METHOD.md §8): maps [B, K, h, w], ``top_idx`` [B, k] = its predicted class's top-k features.

    M~_j = M_j / max(mean_p |M_j(p)|, 1e-5), S_j = softmax_p(M~_j), SID = (1/k) sum_p max_j S_j(p). Range [1/k, 1]:
    1/k when the k maps are identical, 1 when they are peaked at distinct positions. Returns a float tensor [B].
    """
    torch = _torch()
    m = _as_tensor(maps)
    b = m.shape[0]
    idx = _as_tensor(top_idx, device=m.device).long()
    x = torch.gather(m.reshape(b, m.shape[1], -1), 1, idx[:, :, None].expand(-1, -1, m.shape[2] * m.shape[3]))
    x = x.float()
    x = x / x.abs().mean(dim=2, keepdim=True).clamp_min(1e-5)
    return torch.softmax(x, dim=2).amax(dim=1).sum(dim=1) / idx.shape[1]


def segmentation_overlap_per_image(maps: Any, class_weight: Any, mask: Any, variant: str = "gradcam") -> Any:
    """Segmentation overlap of each image at patch resolution (METHOD.md §8, §13 C1). Each value in [0, 1].

    maps [B, K, h, w]; ``class_weight`` [B, K] = the predicted class's weight row; mask [B, h, w] bool, already at
    patch resolution (:func:`patch_mask`; dilate it with :func:`dilate` for the ``*_dilated`` variants).
    - ``gradcam``: G = sum_j w_j M_j, G <- G - min G; sum(G m) / sum G (0 when sum G = 0).
    - ``gradcam_max``: max(G m) / max G (0 when max G = 0).
    - ``max``: mean over the class's non-zero-weight features of max(M_j m) / max M_j (0 where max M_j <= 0).
    An empty mask scores 0. Returns a float tensor [B].
    """
    torch = _torch()
    m = _as_tensor(maps)
    b, k = m.shape[:2]
    x = m.reshape(b, k, -1).float()
    w = _as_tensor(class_weight, device=x.device).float()
    msk = _as_tensor(mask, device=x.device).reshape(b, -1).to(x.dtype)
    if variant == "max":
        nz = w != 0
        peak = x.amax(dim=2)
        inside = (x * msk[:, None, :]).amax(dim=2)
        ratio = torch.where(peak > 0, inside / torch.where(peak > 0, peak, torch.ones_like(peak)), 0.0)
        n = nz.sum(dim=1)
        return torch.where(n > 0, (ratio * nz).sum(dim=1) / n.clamp_min(1), 0.0)
    g = torch.einsum("bk,bkp->bp", w, x)
    g = g - g.amin(dim=1, keepdim=True)
    if variant == "gradcam":
        den = g.sum(dim=1)
        num = (g * msk).sum(dim=1)
    elif variant == "gradcam_max":
        den = g.amax(dim=1)
        num = (g * msk).amax(dim=1)
    else:
        raise ValueError(f"unknown overlap variant {variant!r}; use gradcam, gradcam_max or max")
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


class TestMapScorer:
    """Accumulates the test-map metrics (SID@5, segmentation overlap, pooling baseline) over batches.

    ``weight`` [C, K] is the head's class-feature matrix; the pooling baseline applies the full head
    ``W ((x - mean) / max(std, 1e-6)) + bias`` (mean/std/bias optional) to the spatial mean and max of the maps.
    Call :meth:`update` per batch (predictions, labels, maps [B, K, h, w], patch masks [B, h, w] or None), then
    :meth:`result`.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, weight: Any, keys: list[str], *, k: int = 5, head_mean: Any = None, head_std: Any = None,
                 head_bias: Any = None, device: Any = None) -> None:
        torch = _torch()
        self.keys = list(keys)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        w = _to_numpy(weight).astype(np.float32)
        self.weight = torch.from_numpy(np.ascontiguousarray(w)).to(self.device)
        self.k = int(k)
        top, eligible = top_k_features(w, self.k)
        self.top = torch.from_numpy(top).to(self.device)
        # each class's non-zero-weight features, padded to the largest count (weight 0, invalid) for gathering
        nnz = (w != 0).sum(axis=1)
        width = max(1, int(nnz.max()))
        order = np.argsort(w == 0, axis=1, kind="stable")[:, :width]
        valid = np.arange(width)[None, :] < nnz[:, None]
        self.nz_idx = torch.from_numpy(np.where(valid, order, 0)).to(self.device)
        self.nz_w = torch.from_numpy(np.where(valid, np.take_along_axis(w, order, 1), 0).astype(np.float32)).to(
            self.device)
        self.nz_valid = torch.from_numpy(valid.astype(np.float32)).to(self.device)
        self.eligible = torch.from_numpy(eligible).to(self.device)
        self.mean = None if head_mean is None else _as_tensor(head_mean, self.device, torch.float32).flatten()
        self.std = None if head_std is None else _as_tensor(head_std, self.device, torch.float32).flatten()
        self.bias = None if head_bias is None else _as_tensor(head_bias, self.device, torch.float32).flatten()
        self.want_sid = f"SID@{self.k}" in self.keys
        self.seg_keys = [v for v in SEG_VARIANTS
                         if f"SegOverlap-{v}" in self.keys or (v == "gradcam_dilated" and "Plausibility" in self.keys)]
        self.want_pool = any(k.startswith("Pooling-") for k in self.keys)
        self.n = 0
        self.n_masked = 0
        self.masks_seen = True
        self.sid_sum, self.sid_n = 0.0, 0
        self.seg_sum = dict.fromkeys(self.seg_keys, 0.0)
        self.pool_correct = {"avg": 0, "max": 0}

    def _head(self, x: Any) -> Any:
        if self.mean is not None:
            std = self.std if self.std is not None else _torch().ones_like(self.mean)
            x = (x - self.mean) / std.clamp_min(SIGMA_MIN)
        out = x @ self.weight.T
        return out + self.bias if self.bias is not None else out

    def update(self, pred: Any, labels: Any, maps: Any, masks: Any = None) -> None:
        """Add one batch: predicted classes [B], labels [B], maps [B, K, h, w], patch masks [B, h, w] or None."""
        torch = _torch()
        pred_t = _as_tensor(pred, self.device).long().flatten()
        x = _as_tensor(maps, self.device)
        b = x.shape[0]
        x = x.reshape(b, x.shape[1], -1)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        self.n += b
        if self.want_sid:
            ok = self.eligible[pred_t]
            if bool(ok.all()):
                vals = sid_per_image(x[:, :, :, None], self.top[pred_t])
            elif bool(ok.any()):
                vals = sid_per_image(x[ok][:, :, :, None], self.top[pred_t[ok]])
            else:
                vals = x.new_zeros(0)
            self.sid_sum += float(vals.double().sum())
            self.sid_n += int(vals.numel())
        if self.seg_keys:
            if masks is None:
                self.masks_seen = False
            else:
                self._update_overlap(x, pred_t, masks)
                self.n_masked += b
        if self.want_pool:
            lab = _as_tensor(labels).long().flatten().cpu().numpy()
            for name, pooled in (("avg", x.mean(dim=2)), ("max", x.amax(dim=2))):
                logits = self._head(pooled).cpu().numpy()
                self.pool_correct[name] += int((np.argmax(logits, axis=1) == lab).sum())

    def _update_overlap(self, x: Any, pred_t: Any, masks: Any) -> None:
        """Same values as :func:`segmentation_overlap_per_image`, computed on the class's non-zero-weight maps only."""
        torch = _torch()
        b, _, p = x.shape
        m_np = _to_numpy(masks).astype(bool).reshape(b, *self._grid_of(masks, p))
        variants = {"": m_np}
        if any(v.endswith("_dilated") for v in self.seg_keys):
            variants["_dilated"] = dilate(m_np)
        idx, wts, valid = self.nz_idx[pred_t], self.nz_w[pred_t], self.nz_valid[pred_t]
        xs = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, p))  # [B, m, P]
        g = (wts[:, :, None] * xs).sum(dim=1)
        g = g - g.amin(dim=1, keepdim=True)
        g_sum, g_max = g.sum(dim=1), g.amax(dim=1)
        peak = xs.amax(dim=2)
        n_valid = valid.sum(dim=1)
        for suffix, mk in variants.items():
            msk = torch.from_numpy(mk.reshape(b, p)).to(self.device, x.dtype)
            for base in ("gradcam", "gradcam_max", "max"):
                key = base + suffix
                if key not in self.seg_keys:
                    continue
                if base == "gradcam":
                    den, num = g_sum, (g * msk).sum(dim=1)
                elif base == "gradcam_max":
                    den, num = g_max, (g * msk).amax(dim=1)
                else:
                    inside = (xs * msk[:, None, :]).amax(dim=2)
                    ratio = torch.where(peak > 0, inside / torch.where(peak > 0, peak, torch.ones_like(peak)), 0.0)
                    num, den = (ratio * valid).sum(dim=1), n_valid.to(x.dtype)
                vals = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
                self.seg_sum[key] += float(vals.double().sum())

    @staticmethod
    def _grid_of(masks: Any, p: int) -> tuple[int, ...]:
        shape = tuple(_to_numpy(masks).shape[1:])
        if int(np.prod(shape)) != p:
            raise ValueError(f"masks of shape {shape} do not match maps with {p} positions")
        return shape

    def result(self, actual_accuracy: float | None = None) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        if self.want_sid:
            out[f"SID@{self.k}"] = self.sid_sum / self.sid_n if self.sid_n else 0.0  # B8: 0 when none eligible
        have_masks = self.masks_seen and self.n_masked == self.n and self.n > 0
        for v in self.seg_keys:
            out[f"SegOverlap-{v}"] = self.seg_sum[v] / self.n if have_masks else None
        if "Plausibility" in self.keys:
            out["Plausibility"] = out.get("SegOverlap-gradcam_dilated") if have_masks else None
        if self.want_pool:
            avg = self.pool_correct["avg"] / self.n if self.n else None
            mx = self.pool_correct["max"] / self.n if self.n else None
            out["Pooling-Avg-Accuracy"], out["Pooling-Max-Accuracy"] = avg, mx
            ratio = None
            if avg is not None and actual_accuracy:
                ratio = max(avg, mx) / actual_accuracy
            out["Pooling-Ratio"] = ratio
        return {k: out[k] for k in self.keys if k in out}


# ====================================================================================================================
# Everything at once
# ====================================================================================================================

def _chunk_size(k: int, p: int, budget: int = 1 << 23) -> int:
    return max(1, budget // max(1, k * p))


def _pred_of(predicted: Any) -> np.ndarray:
    """Class indices [M] from predicted classes [M] or logits [M, C]."""
    arr = _to_numpy(predicted)
    return predictions(arr) if arr.ndim == 2 else arr.astype(np.int64).ravel()


def _map_metric(keys: list[str], maps: Any, weight: Any, predicted: Any, labels: Any = None, masks: Any = None,
                **head: Any) -> dict[str, float | None]:
    pred = _pred_of(predicted)
    scorer = TestMapScorer(weight, keys, **head)
    w = _to_numpy(weight)
    step = _chunk_size(w.shape[1], int(np.prod(maps.shape[2:])))
    lab = pred if labels is None else _to_numpy(labels).astype(np.int64).ravel()
    for s in range(0, pred.size, step):
        chunk = maps[s:s + step] if hasattr(maps, "detach") else np.asarray(maps[s:s + step])
        scorer.update(pred[s:s + step], lab[s:s + step], chunk,
                      None if masks is None else _to_numpy(masks)[s:s + step])
    return scorer.result(actual_accuracy=None if labels is None else float(np.mean(pred == lab)))


def sid_at_k(maps: Any, weight: Any, predicted: Any, k: int = 5) -> float:
    """SID@k over a test set: maps [M, K, h, w], head weight [C, K], predicted classes [M] (or logits [M, C]).

    The mean of :func:`sid_per_image` over images whose predicted class has >= k non-zero weights, using that
    class's top-k features by raw weight; 0.0 when no image is eligible (METHOD.md §8, §13 B8). Range [1/k, 1].
    """
    key = f"SID@{int(k)}"
    return float(_map_metric([key], maps, weight, predicted, k=int(k))[key])


def segmentation_overlap(maps: Any, weight: Any, predicted: Any, masks: Any, variant: str = "gradcam_dilated",
                         ) -> float:
    """Mean segmentation overlap over a test set (one of :data:`SEG_VARIANTS`), see
    :func:`segmentation_overlap_per_image`. maps [M, K, h, w], weight [C, K], predicted [M] or logits [M, C],
    masks [M, h, w] bool at patch resolution (un-dilated; ``*_dilated`` variants dilate them). Range [0, 1]."""
    if variant not in SEG_VARIANTS:
        raise ValueError(f"unknown overlap variant {variant!r}; use one of {', '.join(SEG_VARIANTS)}")
    key = f"SegOverlap-{variant}"
    return float(_map_metric([key], maps, weight, predicted, masks=masks)[key])


def plausibility(maps: Any, weight: Any, predicted: Any, masks: Any) -> float:
    """The paper's Plausibility: ``gradcam_dilated`` segmentation overlap (METHOD.md §8). Range [0, 1].

    For the "DINO GradCAM" linear-probe baseline pass ``maps = tokens_to_maps(tokens, grid)`` and the probe's
    weight [C, D].
    """
    return segmentation_overlap(maps, weight, predicted, masks, "gradcam_dilated")


def pooling_baseline(maps: Any, weight: Any, labels: Any, logits: Any, *, head_mean: Any = None,
                     head_std: Any = None, head_bias: Any = None) -> dict[str, float | None]:
    """Accuracy of the head on the spatial mean and on the max of the maps, and max(avg, max) / actual accuracy.

    Keys ``Pooling-Avg-Accuracy``, ``Pooling-Max-Accuracy``, ``Pooling-Ratio`` (None when the accuracy is 0).
    The head is ``W ((x - head_mean) / max(head_std, 1e-6)) + head_bias`` over all K features.
    """
    keys = list(METRIC_GROUPS["pooling_baseline"])
    return _map_metric(keys, maps, weight, logits, labels=labels, head_mean=head_mean, head_std=head_std,
                       head_bias=head_bias)


MAP_KEY_PREFIXES = ("SID@", "SegOverlap-", "Pooling-", "Plausibility")


def map_scorer(weight: Any, keys: list[str], *, head_mean: Any = None, head_std: Any = None, head_bias: Any = None,
               device: Any = None) -> TestMapScorer | None:
    """A :class:`TestMapScorer` for the map-based keys among ``keys`` (None when there are none)."""
    map_keys = [k for k in keys if k.startswith(MAP_KEY_PREFIXES)]
    if not map_keys:
        return None
    return TestMapScorer(weight, map_keys, head_mean=head_mean, head_std=head_std, head_bias=head_bias, device=device)


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
        step = _chunk_size(w.shape[1], int(np.prod(maps.shape[2:])))
        for s in range(0, y_test.size, step):
            e = min(s + step, y_test.size)
            chunk = maps[s:e] if hasattr(maps, "detach") else np.asarray(maps[s:e])
            scorer.update(pred[s:e], y_test[s:e], chunk, None if masks is None else masks[s:e])
    return finish_metrics(keys, train_features=train_features, train_labels=train_labels, test_logits=test_logits,
                          test_labels=test_labels, weight=w, class_attributes=class_attributes,
                          image_attributes=image_attributes, image_attribute_known=image_attribute_known,
                          seed=seed, scorer=scorer)
