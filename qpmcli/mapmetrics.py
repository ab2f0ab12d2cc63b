"""The metrics on test feature maps (METHOD.md §8): SID@k, the segmentation overlaps (Plausibility) and the pooling
baseline, batched and summed over chunks so that memmaps and model outputs can stream through
(:class:`TestMapScorer`); torch is imported on first use. :mod:`qpmcli.metrics` is the public face of all metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from qpmcli.masks import dilate, to_numpy
from qpmcli.metricnames import METRIC_GROUPS, SEG_VARIANTS
from qpmcli.modelfile import SIGMA_MIN


def predictions(logits: Any) -> np.ndarray:
    """Predicted classes: the first maximal logit on ties (numpy argmax, as torch does on the reference's data)."""
    return np.argmax(to_numpy(logits), axis=1)


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
        arr = np.ascontiguousarray(to_numpy(x))
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # memmaps are read-only
    return t.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else t


def top_k_features(weight: Any, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the k highest raw weights' feature indices [C, k] (ties: lower index first) and eligibility [C].

    A class is eligible for SID@k when it has at least k non-zero weights (METHOD.md §8).
    """
    w = to_numpy(weight).astype(np.float64)
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
        w = to_numpy(weight).astype(np.float32)
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
        m_np = to_numpy(masks).astype(bool).reshape(b, *self._grid_of(masks, p))
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
        shape = tuple(to_numpy(masks).shape[1:])
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

def chunk_size(k: int, p: int, budget: int = 1 << 23) -> int:
    """Images per chunk so that a chunk of maps [B, k, p] holds about ``budget`` values."""
    return max(1, budget // max(1, k * p))


def _pred_of(predicted: Any) -> np.ndarray:
    """Class indices [M] from predicted classes [M] or logits [M, C]."""
    arr = to_numpy(predicted)
    return predictions(arr) if arr.ndim == 2 else arr.astype(np.int64).ravel()


def _map_metric(keys: list[str], maps: Any, weight: Any, predicted: Any, labels: Any = None, masks: Any = None,
                **head: Any) -> dict[str, float | None]:
    pred = _pred_of(predicted)
    scorer = TestMapScorer(weight, keys, **head)
    w = to_numpy(weight)
    step = chunk_size(w.shape[1], int(np.prod(maps.shape[2:])))
    lab = pred if labels is None else to_numpy(labels).astype(np.int64).ravel()
    for s in range(0, pred.size, step):
        chunk = maps[s:s + step] if hasattr(maps, "detach") else np.asarray(maps[s:s + step])
        scorer.update(pred[s:s + step], lab[s:s + step], chunk,
                      None if masks is None else to_numpy(masks)[s:s + step])
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
